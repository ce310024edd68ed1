"""Guided beam search: HF's beam search with the candidate step on beams x k tokens, not beams x vocabulary.

Why hand-written: HF's `_beam_search` adds the running beam scores to a (batch, beams x vocabulary) tensor
and takes its top-k; a logits processor can only hand it such a tensor, so guidance had to pick its
candidates, then mask the whole vocabulary for HF to search it again (about 8 % of a step on a small
model, over the issue's time budget). Here the guided scores of each beam's k candidates are ranked
directly. Everything else is HF's own: this function is passed to `generate(custom_generate=...)`, so
argument handling, input expansion, the cache, logits processors and stopping criteria are prepared by
HF, and the bookkeeping of finished hypotheses (length penalty, early stopping, `num_return_sequences`)
and cache reordering use `GenerationMixin`'s beam helpers in `_beam_search`'s order (transformers 5.23).
With `beta = 0` the result is HF beam search's, token for token: no beam can continue with a token
outside its top-(beams to keep), and the candidates' log-probabilities are HF's `log_softmax` values.

Value score of an output: `V(s_0) + sum_t A(s_t, a_t)`, found through `beam_indices` (the running row
whose candidates produced each token).
"""

from __future__ import annotations

import torch
from transformers.generation.utils import ALL_CACHE_NAMES, GenerateBeamDecoderOnlyOutput

from tokenq.guidance import Guide, GuideStep


class BeamTrace:
    """Per step of one guided beam search: the `GuideStep` (candidates, Q, V) and features of every row."""

    def __init__(self, guide: Guide) -> None:
        self.guide = guide
        self.steps: list[tuple[GuideStep, torch.Tensor]] = []

    def value_scores(self, sequences: torch.Tensor, beam_indices: torch.Tensor, prompt_len: int, num_beams: int) -> torch.Tensor:
        """V(s_0) + summed advantages of each output's tokens: (n, P + T), (n, T) -> (n,)."""
        model, q_fn = self.guide.model, self.guide.q_fn
        first, h0 = self.steps[0]
        v0 = first.v if first.v is not None else model.state_value(h0)
        prompt_rows = beam_indices[:, 0].long() // num_beams * num_beams  # every beam of a prompt starts alike
        scores = v0[prompt_rows].clone()
        for t in range(beam_indices.shape[1]):
            rows = beam_indices[:, t].long()
            live = rows >= 0
            step, h = self.steps[t]
            rows = rows.clamp(min=0)
            adv = step.select(rows).chosen_advantage(model, q_fn, h[rows], sequences[:, prompt_len + t])
            scores += torch.where(live, adv, torch.zeros_like(adv))
        return scores


def _unflatten(x: torch.Tensor, batch: int, beams: int) -> torch.Tensor:
    return x.reshape(batch, beams, *x.shape[1:])


def _top_continuations(model, step: GuideStep, guided: torch.Tensor, state: dict, cur_len: int, prompt_len: int, keep: int):
    """HF's `_get_top_k_continuations` on the candidates: the `keep` best (beam, candidate) pairs per prompt
    by running score + guided score. guided (B * beams, k) -> scores (B, keep), sequences, beam indices."""
    batch, beams = state["scores"].shape
    k = guided.shape[-1]
    acc = (_unflatten(guided, batch, beams) + state["scores"][:, :, None]).reshape(batch, beams * k)
    top_scores, flat = acc.topk(keep)
    beam = flat // k
    tokens = step.index.reshape(batch, beams * k).gather(1, flat)
    sequences = model._gather_beams(state["sequences"], beam)
    sequences[:, :, cur_len] = tokens
    beam_indices = model._gather_beams(state["beam_indices"], beam)
    beam_indices[:, :, cur_len - prompt_len] = (beam + torch.arange(batch, device=beam.device)[:, None] * beams).int()
    return top_scores, sequences, beam_indices


def guided_beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                       streamer=None, *, trace: BeamTrace, **model_kwargs) -> GenerateBeamDecoderOnlyOutput:
    """`generate(custom_generate=partial(guided_beam_search, trace=...))`: beam search on `trace.guide`'s
    guided scores. Returns sequences, `sequences_scores` (HF's length-penalised sums) and `beam_indices`."""
    cfg = generation_config
    if cfg.do_sample or streamer is not None or model.config.is_encoder_decoder:
        raise ValueError("guided beam search is deterministic, decoder-only and cannot stream")
    eos = cfg._eos_token_tensor
    beams, max_length, early_stopping, length_penalty = cfg.num_beams, cfg.max_length, cfg.early_stopping, cfg.length_penalty
    batch, prompt_len = input_ids.shape[0] // beams, input_ids.shape[1]
    cur_len, device = prompt_len, input_ids.device
    keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
    top_num_beam_mask = torch.arange(keep, device=device) < beams
    fill = cfg._pad_token_tensor or eos[0] if eos is not None else -1  # HF's own precedence, kept for equal outputs
    running = torch.full((batch, beams, max_length), fill_value=fill, dtype=torch.int64, device=device)
    running[:, :, :cur_len] = _unflatten(input_ids, batch, beams)
    state = {"sequences": running, "scores": torch.zeros((batch, beams), device=device),
             "beam_indices": torch.full((batch, beams, max_length - cur_len), -1, dtype=torch.int32, device=device)}
    state["scores"][:, 1:] = -1e9  # only the first beam's tokens at the first step
    sequences, beam_indices = running.clone(), state["beam_indices"].clone()
    beam_scores = torch.full((batch, beams), -1e9, device=device)
    is_sent_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    this_peer_finished, flat_ids = False, input_ids
    outputs = model._prefill(input_ids, cfg, model_kwargs, is_first_iteration=not cfg.is_assistant)
    while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=device):
        if outputs is None:
            flat_ids = state["sequences"][:, :, :cur_len].reshape(batch * beams, cur_len)
            inputs = model.prepare_inputs_for_generation(flat_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None,
                                                         **model_kwargs)
            outputs = model(**inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits, outputs = outputs.logits[:, -1, :].float(), None
        if synced_gpus and this_peer_finished:
            continue
        h = trace.guide.model.pop_features()[:, -1]
        guided, step = trace.guide.beam_step(flat_ids, logits, h, logits_processor, keep)
        trace.steps.append((step, h))
        top_scores, top_sequences, top_indices = _top_continuations(model, step, guided, state, cur_len, prompt_len, keep)
        hits = _unflatten(stopping_criteria(top_sequences[:, :, : cur_len + 1].reshape(batch * keep, -1), None), batch, keep)
        state["sequences"], state["scores"], state["beam_indices"] = model._get_running_beams_for_next_iteration(
            top_scores, top_sequences, top_indices, hits, beams)
        sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
            sequences, top_sequences, beam_scores, top_scores, beam_indices, top_indices, improvable, is_sent_finished,
            hits, top_num_beam_mask, beams, cur_len, prompt_len, length_penalty, early_stopping)
        cache_key = next((key for key in ALL_CACHE_NAMES if key in model_kwargs), None)
        if cache_key is not None:
            model_kwargs[cache_key].reorder_cache(state["beam_indices"][..., cur_len - prompt_len].reshape(-1))
        cur_len += 1
        improvable = model._check_early_stop_heuristic(improvable, state["scores"], beam_scores, is_sent_finished, cur_len,
                                                       max_length, prompt_len, early_stopping, length_penalty)
        this_peer_finished = not model._beam_search_has_unfinished_sequences(improvable, is_sent_finished, hits, early_stopping)
    n = cfg.num_return_sequences
    sequences, beam_scores = sequences[:, :n].flatten(0, 1), beam_scores[:, :n].flatten(0, 1)
    beam_indices = beam_indices[:, :n].flatten(0, 1)
    generated = int((beam_indices >= 0).sum(1).max())  # HF crops to the longest output
    return GenerateBeamDecoderOnlyOutput(sequences=sequences[:, : prompt_len + generated], sequences_scores=beam_scores,
                                         beam_indices=beam_indices[:, :generated])
