"""Q-guided decoding: one entry point, `tokenq.generate`, for every strategy.

The policy (the logits) and the critic (the heads that steer them) are `tokenq.steering.Steering`: a `TokenQModel`
steering its own LM (one forward per token), or any HF causal LM steered by a `critic=` `TokenQModel` on another
(usually smaller) backbone with the same tokenizer, each model with its own KV cache. `eta=` reads a distributional
critic as Q♯'s `Q_eta` and steers with beta = 1 / eta (`tokenq.distributional`).

Strategies (all on the guided scores of `tokenq.guidance.Guide`: pi_beta filtered, then `+ beta * A`):
- `sample`, `greedy`: HF `generate` with the guidance as the last logits processor (HF's own warpers are
  switched off and re-applied first), so stopping criteria, stop strings and streamers are HF's.
- `beam`: HF `generate` with `tokenq.beam.guided_beam_search` as its decoding loop (HF's beam bookkeeping,
  the guided ranking on beams x k candidates). `beta = 0` is exactly HF sampling / greedy / beam search.
- `best_of_n`: N candidates per prompt (guided with `beta`, plain with `beta = 0`) from one shared prompt
  cache; returns the one with the best value score, or the best `reward_fn` score.
- `resample`: the same candidates; returns one drawn with probability ∝ exp(score / resample_temperature)
  (Q-probe, Li et al. 2024; IDQL, Hansen-Estruch et al. 2023).
- `step_search`: at every step boundary (a stop string such as ";" or "\\n", or every `step_tokens`
  tokens) K continuations per kept sequence; keeps the `step_beam` best by value score (blockwise CD-Q,
  Mudgal et al. 2024; Q*, Wang et al. 2024).
- `dvts`: diverse verifier tree search (Beeching et al. 2024): `num_candidates` split into independent step
  searches of `num_continuations` each, for diversity; the best subtree's answer, or a vote over them.
- `astar`: A* over steps with the critic's value as f = g + h (Q*, Wang et al. 2024): a priority queue of
  partial solutions, the best expanded next (`num_continuations` children), backtracking included
  (`tokenq.tree`); `mcts`: Monte-Carlo tree search over steps, PUCT with the policy's step probabilities as
  priors and the critic's value as the leaf evaluation. Both spend at most `num_candidates` completions' tokens
  (`num_candidates * max_new_tokens` per prompt), every sibling expanded from its parent's KV cache.

Step-level strategies (step_search, dvts, astar, mcts) rank paths by `aggregate` of their step scores
(`tokenq.votes`: last, min, prod, mean, or the default `advantage`, the value score below). Candidate strategies
(best_of_n, resample, dvts) can pick by `vote="majority" | "weighted"` over the answers `answer_fn(completion)`.

Value score of a sequence: `V(s_0) + sum_t A(s_t, a_t)`, `A = min_i Qbar_i - V`, over its generated tokens:
its predicted return from the prompt. Token transitions are deterministic (`Q(s_t, a_t) = r_t + V(s_{t+1})`
for exact heads), so this telescopes to the rewards its tokens earn plus the value where it ends (for an
EOS, the predicted return of the finished sequence); for step search it ranks a step by its reward plus the
value after it. Summed advantages stay informative when the heads judge a token well in the state where
it is chosen but cannot re-derive its effect from the state after it (arithmetic: Q(s, digit) is learnt
from the LM's own prediction of the digit; V after the digit must recompute the sum). No extra forward.

Every call returns `GuidedOutput`: the sequences and, per prompt, the score, the generated tokens and the
forward rows spent by the policy and by a separate critic (every candidate counted), and for sampling strategies
the KL estimate.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteriaList, StopStringCriteria

from tokenq.backbone import base_model_of
from tokenq.distributional import check_eta
from tokenq.beam import BeamGuidance, BeamTrace, guided_beam_search, private_beam_loop_tested
from tokenq.guidance import Guide, GuidanceProcessor
from tokenq.search import CandidateSearch, candidates_then_pick, dvts, step_search
from tokenq.steering import Steering, hf_features
from tokenq.tree_rows import tree_search
from tokenq.votes import AGGREGATES, VOTES

if TYPE_CHECKING:  # tokenq.modeling imports this module (TokenQModel.generate)
    from tokenq.modeling import TokenQModel

STRATEGIES = ("sample", "greedy", "beam", "best_of_n", "resample", "step_search", "dvts", "astar", "mcts")
STEP_STRATEGIES = ("step_search", "dvts", "astar", "mcts")  # rank paths by an aggregate of step scores
VOTING_STRATEGIES = ("best_of_n", "resample", "dvts")  # can vote over their candidates' answers


@dataclass
class GuidedOutput:
    """`sequences` (B, P + new): the left-padded prompts followed by the completions (right-padded); beam
    search with `num_return_sequences=n` returns n rows per prompt, each with its `scores` entry.
    Per prompt, (B,): `scores` (what the strategy ranked by: the value score, `aggregate` of step scores, or the
    `reward_fn` score), `generated_tokens` (all tokens sampled
    for it, discarded candidates included), `forward_passes` (the policy's forward rows spent on it: a prompt
    prefill or one token of one candidate each), `critic_forward_passes` (the same for a separate critic; None when
    the critic reads the policy's own forward), `kl` (sum over tokens of KL(pi_guided || pi_beta) along the
    returned sequence, plus the selection term of best-of-N / resampling / step search; None for greedy and
    beam)."""

    sequences: torch.LongTensor
    scores: torch.Tensor
    generated_tokens: torch.LongTensor
    forward_passes: torch.LongTensor
    kl: torch.Tensor | None = None
    candidates: torch.LongTensor | None = None  # (B, N, new) best_of_n / resample candidates (dvts: subtrees), pad-filled
    candidate_scores: torch.Tensor | None = None  # (B, N)
    critic_forward_passes: torch.LongTensor | None = None


def _resolve_strategy(strategy: str | None, do_sample: bool | None, num_beams: int) -> str:
    if strategy is None:
        strategy = "beam" if num_beams > 1 else "greedy" if do_sample is False else "sample"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_beams > 1 and strategy != "beam":
        raise ValueError(f"num_beams={num_beams} only applies to strategy='beam'")
    if strategy == "beam" and num_beams < 2:
        raise ValueError(f"beam search needs num_beams >= 2, got {num_beams} (one beam is greedy decoding: strategy='greedy')")
    if strategy == "beam" and do_sample:
        raise ValueError("guided beam search is deterministic: beam sampling (do_sample=True) is not supported")
    return strategy


def generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    *,
    critic: TokenQModel | None = None,
    eta: float | None = None,
    strategy: str | None = None,
    beta: float | None = None,
    max_new_tokens: int = 20,
    do_sample: bool | None = None,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    num_candidates: int = 4,
    reward_fn=None,
    resample_temperature: float = 1.0,
    num_continuations: int = 4,
    step_stop_strings: str | list[str] | None = None,
    step_tokens: int | None = None,
    step_beam: int = 1,
    aggregate: str = "advantage",
    vote: str | None = None,
    answer_fn=None,
    c_puct: float = 1.0,
    **generate_kwargs,
) -> GuidedOutput:
    """Decode from `model` steered by the critic's heads; see the module docstring for the strategies.

    `model`: a `TokenQModel` (its LM is the policy; its heads are the critic unless `critic=` is given) or any HF
    causal LM with `critic=` (a `TokenQModel` with the policy's vocabulary: `tokenq.steering.check_same_vocabulary`).
    `beta` (default 1): the weight of the critic's advantage; `eta`: read a distributional critic as `Q_eta`, with
    beta = 1 / eta (KL-optimal; a different `beta` is refused). `input_ids` / `attention_mask` (B, P), left-padded (right-padded prompts are refused: `check_prompts`; every
    argument is range-checked first: `check_decoding_args`). `temperature` / `top_k` / `top_p` define pi_beta's
    filter for every strategy. Remaining keyword arguments (`stopping_criteria`, `streamer`,
    `length_penalty`, ...) go to HF `generate` (strategies sample / greedy / beam). `reward_fn(prompts,
    completions) -> list[float]` (decoded with `tokenizer`) replaces the value score for best_of_n / resample.
    `num_candidates` is the budget of best_of_n / resample / dvts (candidates) and astar / mcts (completions' tokens);
    `num_continuations` the children of every expansion of step_search / dvts / astar / mcts; `aggregate` (step-level
    strategies), `vote` + `answer_fn(completion) -> str` (best_of_n / resample / dvts), `c_puct` (mcts):
    `tokenq.votes`, `tokenq.tree`.
    """
    beta = guidance_weight(beta, eta)
    check_decoding_args(beta=beta, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        num_beams=num_beams, num_candidates=num_candidates, num_continuations=num_continuations,
                        step_tokens=step_tokens, step_beam=step_beam, resample_temperature=resample_temperature,
                        aggregate=aggregate, vote=vote, c_puct=c_puct)
    strategy = _resolve_strategy(strategy, do_sample, num_beams)
    check_strategy_knobs(strategy, aggregate=aggregate, vote=vote, answer_fn=answer_fn, tokenizer=tokenizer)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    steering = Steering.of(model, critic)
    check_prompts(steering.policy, input_ids, attention_mask, max_new_tokens)
    if not steering.shared:
        check_prompts(steering.critic.backbone, input_ids, attention_mask, max_new_tokens)
    gen_config = steering.policy.generation_config
    eos = eos_token_id if eos_token_id is not None else gen_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else gen_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    mode = {"greedy": "greedy", "beam": "beam"}.get(strategy, "greedy" if do_sample is False else "sample")
    guide = Guide(steering.critic, beta, mode, temperature, top_k, top_p, exact_hf=strategy in ("sample", "greedy", "beam"),
                  num_beams=num_beams, eta=eta)
    modules = (steering.policy, steering.critic)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            if strategy in ("sample", "greedy", "beam"):
                return _hf_generate(steering, guide, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    eos=eos, pad=pad, stop_strings=stop_strings, tokenizer=tokenizer, **generate_kwargs)
            if generate_kwargs:
                raise ValueError(f"{sorted(generate_kwargs)} only apply to strategies sample / greedy / beam")
            search = CandidateSearch(steering, guide, max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                                     stop_strings=stop_strings, tokenizer=tokenizer)
            steps = {"step_stop_strings": step_stop_strings, "step_tokens": step_tokens, "aggregate": aggregate}
            if strategy == "step_search":
                rows = step_search(search, input_ids, attention_mask, num_continuations, step_beam=step_beam, **steps)
            elif strategy == "dvts":
                rows = dvts(search, input_ids, attention_mask, num_candidates, num_continuations, vote_how=vote,
                            answer_fn=answer_fn, **steps)
            elif strategy in ("astar", "mcts"):
                rows = tree_search(search, strategy, input_ids, attention_mask, num_candidates, num_continuations,
                                   c_puct=c_puct, **steps)
            else:
                rows = candidates_then_pick(search, input_ids, attention_mask, num_candidates, strategy,
                                            reward_fn, tokenizer, resample_temperature, vote, answer_fn)
            return _search_output(search, input_ids, rows, strategy)
    finally:
        for m, mode_was in zip(modules, was_training):
            m.train(mode_was)


def guidance_weight(beta: float | None, eta: float | None) -> float:
    """The guidance weight: `beta` (default 1), or 1 / eta with `eta` (Q♯'s KL-optimal policy)."""
    if eta is None:
        return 1.0 if beta is None else beta
    check_eta(eta)
    if beta is not None and not math.isclose(beta, 1.0 / eta):
        raise ValueError(f"eta={eta} steers with beta = 1/eta = {1.0 / eta:g}; got beta={beta} as well: pass one of them")
    return 1.0 / eta


def check_decoding_args(*, beta: float = 1.0, max_new_tokens: int = 1, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, num_beams: int = 1, num_candidates: int = 1,
                        num_continuations: int = 1, step_tokens: int | None = None, step_beam: int = 1,
                        resample_temperature: float = 1.0, aggregate: str = "advantage", vote: str | None = None,
                        c_puct: float = 1.0) -> None:
    """Every decoding knob in its range, checked once before any model is touched — by `generate` for every strategy,
    by the `tokenq` commands before a checkpoint is loaded, by `EvalArguments` before training; the error names the
    argument and its range. (Greedy decoding is `strategy="greedy"`, not temperature 0.)"""
    def fail(name: str, value, allowed: str):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")

    def is_number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def is_count(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

    if not is_number(beta) or beta < 0:
        fail("beta", beta, "a finite number >= 0 (0 = pi_beta itself)")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams), ("num_candidates", num_candidates),
                        ("num_continuations", num_continuations), ("step_beam", step_beam)):
        if not is_count(value):
            fail(name, value, "an integer >= 1")
    if step_tokens is not None and not is_count(step_tokens):
        fail("step_tokens", step_tokens, "an integer >= 1 (or None, with step_stop_strings)")
    if top_k is not None and not (top_k == 0 or is_count(top_k)):
        fail("top_k", top_k, "an integer >= 0 (0 or None: no top-k filter)")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        fail("top_p", top_p, "in (0, 1] (1 or None: no top-p filter)")
    for name, value in (("temperature", temperature), ("resample_temperature", resample_temperature)):
        if value is not None and (not is_number(value) or value <= 0):
            fail(name, value, "a finite number > 0" + (" (greedy decoding: strategy 'greedy')" if name == "temperature"
                                                       else " (the best candidate always: strategy 'best_of_n')"))
    if aggregate not in AGGREGATES:
        fail("aggregate", aggregate, f"one of {AGGREGATES}")
    if vote is not None and vote not in VOTES:
        fail("vote", vote, f"one of {VOTES} (or None: the best score)")
    if not is_number(c_puct) or c_puct < 0:
        fail("c_puct", c_puct, "a finite number >= 0")


def check_strategy_knobs(strategy: str, *, aggregate: str = "advantage", vote: str | None = None, answer_fn=None,
                         tokenizer=None) -> None:
    """`aggregate` and `vote` only where the strategy uses them (a silently ignored knob would mislabel a result)."""
    if aggregate != "advantage" and strategy not in STEP_STRATEGIES:
        raise ValueError(f"aggregate={aggregate!r} ranks step scores: it applies to strategies {STEP_STRATEGIES}, not {strategy!r}")
    if vote is not None:
        if strategy not in VOTING_STRATEGIES:
            raise ValueError(f"vote={vote!r} picks among candidates: it applies to strategies {VOTING_STRATEGIES}, not {strategy!r}")
        if answer_fn is None or tokenizer is None:
            raise ValueError("vote= needs answer_fn= (a completion's final answer, e.g. a task's `answer`) and tokenizer=")


def check_prompts(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
    """Prompts every strategy can continue, checked before any forward (HF and the search loops fail deep inside, or
    return junk, on these): (B, P) ids and mask of one shape, no empty prompt, left padding (new tokens are appended
    after the last position: a right-padded prompt would be continued after its padding), and prompt plus new tokens
    within the backbone's positions."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (batch, prompt length), got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    lengths = attention_mask.sum(dim=1) if input_ids.shape[1] else torch.zeros(len(input_ids), dtype=torch.long)
    if empty := (lengths == 0).nonzero().flatten().tolist():
        raise ValueError(f"prompt {empty[0]} is empty (no unmasked token): every prompt needs at least one token, e.g. BOS")
    if right := (attention_mask[:, -1] == 0).nonzero().flatten().tolist():
        raise ValueError(f"prompt(s) {right} are right-padded (their last position is masked): tokenize with "
                         "padding_side='left' (tokenizer.padding_side = 'left'), as HF generate expects")
    positions = getattr(base_model_of(backbone).config.get_text_config(), "max_position_embeddings", None)
    longest = int(lengths.max())
    if positions is not None and longest + max_new_tokens > positions:
        i = int(lengths.argmax())
        if longest >= positions:
            message = f"prompt {i} has {longest} tokens: no room for new tokens in the backbone's {positions} positions"
        else:
            message = (f"prompt {i} has {longest} tokens, plus max_new_tokens={max_new_tokens} makes {longest + max_new_tokens}"
                       f" positions, more than the backbone's {positions}: lower max_new_tokens to <= {positions - longest}")
        raise ValueError(f"{message} (max_position_embeddings), or shorten the prompt")


def _search_output(search: CandidateSearch, input_ids: torch.Tensor, rows, strategy: str) -> GuidedOutput:
    tree = strategy in ("astar", "mcts")  # no estimate of what the tree's choices add to the tokens' KL
    return GuidedOutput(
        sequences=torch.cat([input_ids, rows.out[:, : int(rows.n_gen.max())]], dim=1),
        scores=rows.score, generated_tokens=search.spent_tokens, forward_passes=search.forward_rows,
        kl=rows.kl if search.guide.mode == "sample" and not tree else None,
        candidates=search.candidates, candidate_scores=search.candidate_scores, critic_forward_passes=search.critic_forward_rows,
    )


def generated_lengths(new_tokens: torch.Tensor, eos: list[int], pad: int, stop_strings: list[str] | None, tokenizer) -> torch.Tensor:
    """Tokens each row of HF `generate`'s output really generated: up to the first EOS (included), or the
    end of the first stop string, else up to the last non-pad token (HF pads rows that finished)."""
    lengths = []
    for row in new_tokens.tolist():
        n = len(row)
        hits = [i for i, t in enumerate(row) if t in eos]
        if hits:
            n = hits[0] + 1
        elif pad not in eos:
            while n and row[n - 1] == pad:
                n -= 1
        if stop_strings:
            n = next((i for i in range(1, n + 1) if any(tokenizer.decode(row[:i]).endswith(s) for s in stop_strings)), n)
        lengths.append(n)
    return torch.tensor(lengths, dtype=torch.long, device=new_tokens.device)


def _hf_generate(steering: Steering, guide: Guide, input_ids, attention_mask, **kwargs) -> GuidedOutput:
    with hf_features(steering, attention_mask) as (features, policy_rows):
        out, processor, trace = _hf_decode(steering.policy, guide, features, input_ids, attention_mask, **kwargs)
    batch = input_ids.shape[0]
    forward_rows = torch.full((batch,), policy_rows["rows"] // batch, dtype=torch.long)
    critic_rows = None if steering.shared else torch.full((batch,), features.rows // batch, dtype=torch.long)
    if guide.mode == "beam":  # every running beam got a token at every step
        scores = trace.value_scores(out.sequences, out.beam_indices, input_ids.shape[1])
        return GuidedOutput(out.sequences, scores, torch.full((batch,), kwargs["num_beams"] * len(trace.features)), forward_rows,
                            None, critic_forward_passes=critic_rows)
    sequences = out
    new = sequences[:, input_ids.shape[1] :]
    lengths = generated_lengths(new, kwargs["eos"], kwargs["pad"], kwargs["stop_strings"], kwargs["tokenizer"])
    processor.finish(sequences)
    generated = torch.arange(new.shape[1], device=new.device).unsqueeze(0) < lengths.unsqueeze(1)
    scores = processor.v0 + (torch.stack(processor.adv_chosen, dim=1) * generated).sum(1)
    kl = (torch.stack(processor.kl, 1) * generated).sum(1) if processor.kl else None
    return GuidedOutput(sequences, scores, lengths, forward_rows, kl, critic_forward_passes=critic_rows)


def _hf_decode(policy, guide: Guide, features, input_ids, attention_mask, *, num_beams, max_new_tokens, eos, pad,
               stop_strings, tokenizer, **generate_kwargs):
    """HF `generate` on the policy with the guidance as its last logits processor (or as its beam-search loop)."""
    processor, trace = GuidanceProcessor(guide, features), BeamTrace(guide)
    # HF's own warpers off: the guide applies pi_beta's filter itself, before the advantage
    if guide.mode == "sample":
        mode = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "logits_processor": [processor]}
    elif guide.mode == "greedy":
        mode = {"do_sample": False, "logits_processor": [processor]}
    elif not private_beam_loop_tested():  # the public path (tokenq.beam's docstring)
        keep = max(2, 1 + len(eos)) * num_beams  # the continuations HF's beam search keeps per step
        mode = {"do_sample": False, "logits_processor": [BeamGuidance(trace, keep, features)], "return_dict_in_generate": True}
    else:
        mode = {"do_sample": False, "custom_generate": partial(guided_beam_search, trace=trace, features=features), "return_dict_in_generate": True}
        if generate_kwargs.get("streamer") is not None:  # HF's own check does not reach a custom decoding loop
            raise ValueError("a streamer cannot be used with beam search (HF's rule): stream with num_beams=1")
        if stop_strings:  # HF drops `tokenizer` on the way to a custom decoding loop: build the criterion here
            if tokenizer is None:
                raise ValueError("stop strings need `tokenizer=` to decode the generated text")
            criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
            generate_kwargs["stopping_criteria"] = criteria + [StopStringCriteria(tokenizer, stop_strings)]
            stop_strings = None
    out = policy.generate(
        input_ids=input_ids, attention_mask=attention_mask, **mode, num_beams=num_beams, max_new_tokens=max_new_tokens,
        eos_token_id=eos or None, pad_token_id=pad, stop_strings=stop_strings, tokenizer=tokenizer, **generate_kwargs,
    )
    return out, processor, trace


def guided_sample(model, input_ids, attention_mask=None, beta: float | None = None, **kwargs) -> torch.Tensor:
    """Guided sampling; returns only the sequences (B, P + new). See `generate`."""
    return generate(model, input_ids, attention_mask, strategy="sample", beta=beta, **kwargs).sequences
