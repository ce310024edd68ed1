"""Guided beam search: HF's beam search with the candidate step on beams x k tokens, not beams x vocabulary.

Why hand-written: HF's `_beam_search` adds the running beam scores to a (batch, beams x vocabulary) tensor
and takes its top-k; a logits processor can only hand it such a tensor, so guidance had to pick its
candidates, then mask the whole vocabulary for HF to search it again (about 8 % of a step on a small
model, over the issue's time budget). Here the guided scores of each beam's k candidates are ranked
directly. Everything else is HF's own: this function is passed to `generate(custom_generate=...)`, so
argument handling, input expansion, the cache, logits processors and stopping criteria are prepared by
HF, and the bookkeeping of finished hypotheses (length penalty, early stopping, `num_return_sequences`)
and cache reordering use `GenerationMixin`'s beam helpers in `_beam_search`'s order (transformers 5.23 – 5.25; 5.25 changed only `_prefill`, for linear-attention caches).
With `beta = 0` the result is HF beam search's, token for token: no beam can continue with a token
outside its top-(beams to keep), and the candidates' log-probabilities are HF's `log_softmax` values.
One departure in cost, not result: each prompt is prefilled once and its KV cache expanded to the beams
(HF prefills every beam's copy of the prompt).

Value score of an output: `V(s_0) + sum_t A(s_t, a_t)`, each token scored in the state of the running row
that produced it (HF's `beam_indices`), all at once after the search.

The helpers are private: a new transformers release can change them without a word (5.24 renamed the cache
keyword and this loop returned wrong beams until a test caught it). So the loop runs only on the transformers
versions it was tested on (`TESTED_TRANSFORMERS`, both ends run by CI); on any other version guided beam
search takes the public path instead, HF's own beam search with the guidance as its last logits processor
(`BeamGuidance`): the same beams (tests), at the cost of masking the whole vocabulary and prefilling every beam.
"""

from __future__ import annotations

import logging

import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessor
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from tokenq.guidance import Guide

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ("5.23", "5.25")  # lowest and highest minor release this loop was checked against


def private_beam_loop_tested(version: str | None = None) -> bool:
    """Whether `guided_beam_search` may run on this transformers version (a minor release within the tested range);
    otherwise `tokenq.generate` takes the public path (`BeamGuidance`)."""
    release = Version(version or transformers.__version__).release[:2]
    low, high = (Version(v).release[:2] for v in TESTED_TRANSFORMERS)
    return low <= release <= high


class BeamGuidance(LogitsProcessor):
    """The public path of guided beam search: the last logits processor of HF's own beam search. HF hands it the
    beams' scores (log-softmax, then the user's processors) over the vocabulary; it returns the guided scores of
    each row's candidates and -inf elsewhere, and records the features for the value scores (`trace`)."""

    def __init__(self, trace: BeamTrace, keep: int, features) -> None:
        self.trace, self.keep, self.features = trace, keep, features

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        h = self.features(input_ids)
        self.trace.features.append(h)
        values, index = self.trace.guide.beam_candidates(scores, h, self.keep)
        return torch.full_like(scores, float("-inf")).scatter_(-1, index, values)


class BeamTrace:
    """The features of every running row at every step of one guided beam search (for the value scores)."""

    def __init__(self, guide: Guide) -> None:
        self.guide = guide
        self.features: list[torch.Tensor] = []  # (B * beams, H) per step

    def value_scores(self, sequences: torch.Tensor, beam_indices: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """V(s_0) + summed A = min_i Qbar_i - V of each output's tokens, each scored in the state of the row
        that produced it: sequences (n, P + T), beam_indices (n, T) (-1 past the end) -> (n,)."""
        v_fn, steps = self.guide.v_fn, beam_indices.shape[1]
        rows = beam_indices.T.long()  # (T, n)
        h = torch.stack(self.features[:steps])[torch.arange(steps)[:, None], rows.clamp(min=0)]  # (T, n, H)
        tokens = sequences[:, prompt_len : prompt_len + steps].T.reshape(-1, 1)
        adv = self.guide.q_fn(h.flatten(0, 1), tokens).view(steps, -1) - v_fn(h)
        return v_fn(h[0]) + (adv * (rows >= 0)).sum(0)


def _unflatten(x: torch.Tensor, batch: int, beams: int) -> torch.Tensor:
    return x.reshape(batch, beams, *x.shape[1:])


def _top_continuations(model, index: torch.Tensor, guided: torch.Tensor, state: dict, cur_len: int, prompt_len: int, keep: int):
    """HF's `_get_top_k_continuations` on the candidates: the `keep` best (beam, candidate) pairs per prompt
    by running score + guided score. index, guided (B * beams, k) -> scores (B, keep), sequences, beam indices."""
    batch, beams = state["scores"].shape
    k = guided.shape[-1]
    acc = (_unflatten(guided, batch, beams) + state["scores"][:, :, None]).reshape(batch, beams * k)
    top_scores, flat = acc.topk(keep)
    beam = flat // k
    tokens = index.reshape(batch, beams * k).gather(1, flat)
    sequences = model._gather_beams(state["sequences"], beam)
    sequences[:, :, cur_len] = tokens
    beam_indices = model._gather_beams(state["beam_indices"], beam)
    beam_indices[:, :, cur_len - prompt_len] = (beam + torch.arange(batch, device=beam.device)[:, None] * beams).int()
    return top_scores, sequences, beam_indices


def _initial_beams(input_ids: torch.Tensor, cfg, batch: int, beams: int) -> tuple[dict, dict]:
    """HF `_beam_search`'s starting state: the running beams (only the first one scored, so that the first
    step does not pick the same token in every beam) and no finished hypotheses yet (score -1e9)."""
    eos, device, prompt_len = cfg._eos_token_tensor, input_ids.device, input_ids.shape[1]
    fill = cfg._pad_token_tensor or eos[0] if eos is not None else -1  # HF's own precedence, kept for equal outputs
    sequences = torch.full((batch, beams, cfg.max_length), fill_value=fill, dtype=torch.int64, device=device)
    sequences[:, :, :prompt_len] = _unflatten(input_ids, batch, beams)
    beam_indices = torch.full((batch, beams, cfg.max_length - prompt_len), -1, dtype=torch.int32, device=device)
    scores = torch.zeros((batch, beams), device=device)
    scores[:, 1:] = -1e9
    running = {"sequences": sequences, "scores": scores, "beam_indices": beam_indices}
    finished = {"sequences": sequences.clone(), "scores": torch.full_like(scores, -1e9), "beam_indices": beam_indices.clone(),
                "done": torch.zeros_like(scores, dtype=torch.bool)}
    return running, finished


def _kv_cache(model_kwargs: dict):
    """The KV cache `generate` keeps in `model_kwargs` (None with `use_cache=False`), looked up as HF's own beam
    search does: under the names of this transformers version (`past_key_values` until 5.23, `cache` since)."""
    from transformers.generation.utils import ALL_CACHE_NAMES  # private, and only on the tested versions

    return next((model_kwargs[name] for name in ALL_CACHE_NAMES if model_kwargs.get(name) is not None), None)


def _prefill_once(model, input_ids, cfg, model_kwargs: dict, beams: int, features):
    """HF runs each prompt once per beam; run it once and expand its KV cache (and the first logits and the
    critic's features) to the beams instead. Returns the outputs, logits (B * beams, V) and features (B * beams, H)."""
    rows, cache = input_ids.shape[0], _kv_cache(model_kwargs)
    if cache is None:  # use_cache=False: nothing to expand
        outputs = model._prefill(input_ids, cfg, model_kwargs, is_first_iteration=not cfg.is_assistant)
        return outputs, outputs.logits[:, -1, :].float(), features(input_ids)
    once = {k: v[::beams] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v for k, v in model_kwargs.items()}
    outputs = model._prefill(input_ids[::beams], cfg, once, is_first_iteration=not cfg.is_assistant)
    cache.batch_repeat_interleave(beams)  # the prefill filled this cache in place
    h = features(input_ids[::beams])
    features.expand(beams)
    return outputs, outputs.logits[:, -1, :].float().repeat_interleave(beams, dim=0), h.repeat_interleave(beams, dim=0)


def guided_beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                       streamer=None, *, trace: BeamTrace, features, **model_kwargs) -> GenerateBeamDecoderOnlyOutput:
    """`generate(custom_generate=partial(guided_beam_search, trace=..., features=...))`: beam search on `trace.guide`'s
    guided scores, `features(input_ids)` giving the critic's features of the running rows (`tokenq.steering`).
    Returns sequences, `sequences_scores` (HF's length-penalised sums) and `beam_indices`."""
    cfg, guide = generation_config, trace.guide
    if cfg.do_sample or streamer is not None or model.config.is_encoder_decoder:
        raise ValueError("guided beam search is deterministic, decoder-only and cannot stream")
    eos, beams = cfg._eos_token_tensor, cfg.num_beams
    batch, prompt_len = input_ids.shape[0] // beams, input_ids.shape[1]
    cur_len, device, this_peer_finished, flat_ids = prompt_len, input_ids.device, False, input_ids
    keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
    top_num_beam_mask = torch.arange(keep, device=device) < beams
    running, finished = _initial_beams(input_ids, cfg, batch, beams)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)  # the best hypotheses may still improve
    outputs, logits, h = _prefill_once(model, input_ids, cfg, model_kwargs, beams, features)
    while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=device):
        if logits is None:
            flat_ids = running["sequences"][:, :, :cur_len].reshape(batch * beams, cur_len)
            inputs = model.prepare_inputs_for_generation(flat_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None,
                                                         **model_kwargs)
            outputs = model(**inputs, return_dict=True)
            logits, h = outputs.logits[:, -1, :].float(), features(flat_ids)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        if synced_gpus and this_peer_finished:
            logits = None
            continue
        guided, index = guide.beam_step(flat_ids, logits, h, logits_processor, keep)
        trace.features.append(h)
        top_scores, top_sequences, top_indices = _top_continuations(model, index, guided, running, cur_len, prompt_len, keep)
        hits = _unflatten(stopping_criteria(top_sequences[:, :, : cur_len + 1].reshape(batch * keep, -1), None), batch, keep)
        running = dict(zip(running, model._get_running_beams_for_next_iteration(top_scores, top_sequences, top_indices, hits, beams)))
        finished = dict(zip(finished, model._update_finished_beams(
            finished["sequences"], top_sequences, finished["scores"], top_scores, finished["beam_indices"], top_indices, improvable,
            finished["done"], hits, top_num_beam_mask, beams, cur_len, prompt_len, cfg.length_penalty, cfg.early_stopping)))
        if (cache := _kv_cache(model_kwargs)) is not None:
            cache.reorder_cache(running["beam_indices"][..., cur_len - prompt_len].reshape(-1))
        cur_len, outputs, logits = cur_len + 1, None, None
        improvable = model._check_early_stop_heuristic(improvable, running["scores"], finished["scores"], finished["done"], cur_len,
                                                       cfg.max_length, prompt_len, cfg.early_stopping, cfg.length_penalty)
        this_peer_finished = not model._beam_search_has_unfinished_sequences(improvable, finished["done"], hits, cfg.early_stopping)
    return _outputs(finished, cfg.num_return_sequences, prompt_len)


def _outputs(finished: dict, n: int, prompt_len: int) -> GenerateBeamDecoderOnlyOutput:
    """The best `n` hypotheses per prompt, cropped to the longest (HF's output)."""
    sequences, scores, beam_indices = (finished[k][:, :n].flatten(0, 1) for k in ("sequences", "scores", "beam_indices"))
    generated = int((beam_indices >= 0).sum(1).max())
    return GenerateBeamDecoderOnlyOutput(sequences=sequences[:, : prompt_len + generated], sequences_scores=scores,
                                         beam_indices=beam_indices[:, :generated])
