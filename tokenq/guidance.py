"""The guided next-token scores shared by every decoding strategy.

pi_beta's logits are filtered first (temperature, top-k, top-p: HF's own warpers, in HF's order); the
surviving candidates then get `+ beta * A(s, a)` with `A = min_i Qbar_i(s, a) - V(s)` (ILQL, Snell et al.
2022, eq. 9, with the filter first so the guided policy never leaves pi_beta's support). Q is evaluated on
the candidates only (a gather of k rows of the Q head's token embedding), and so is the per-step
KL(pi_guided || pi_beta), where pi_beta is the filtered behaviour policy that plain sampling with the same
settings uses. Greedy and beam search take pi_beta's top-max(16, 2 x beams) as candidates unless `top_k`
says otherwise: neither can pick a token outside a row's top-(2 x beams) at beta = 0, so their results
stay HF's there. Beam search ranks the candidates itself (`tokenq.beam`); the other strategies get
vocabulary-sized scores (-inf off the support).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

if TYPE_CHECKING:  # tokenq.modeling imports this module (TokenQModel.generate)
    from tokenq.modeling import TokenQModel


SEARCH_TOP_K = 16


def behaviour_filter(temperature: float | None = 1.0, top_k: int | None = None, top_p: float | None = None) -> LogitsProcessorList:
    """pi_beta's sampling filter as HF builds it (same classes, same order as `GenerationMixin`)."""
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors


def kl_divergence(guided: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """KL(softmax(guided) || softmax(behaviour)) per row over the finite entries; (B, K) -> (B,)."""
    log_p = torch.log_softmax(guided, dim=-1)
    log_q = torch.log_softmax(behaviour, dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isfinite(guided), terms, torch.zeros_like(terms)).sum(-1)


class GuideStep(NamedTuple):
    scores: torch.Tensor | None  # (B, V) guided scores (dropped once used)
    kl: torch.Tensor | None  # (B,) KL(pi_guided || pi_beta) of this step (sampling only)
    index: torch.Tensor | None  # (B, k) candidate tokens, None = the whole vocabulary
    q: torch.Tensor | None  # (B, k) or (B, V) min target Q of the candidates; None when beta = 0
    v: torch.Tensor | None = None  # (B,) V(s) of the current states; None when beta = 0

    def chosen_advantage(self, guide: Guide, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """A(s, a) = min_i Qbar_i(s, a) - V(s) of the chosen tokens (B,), as `guide` reads the critic."""
        v = self.v if self.v is not None else guide.v_fn(h)
        return self.chosen_value(guide.q_fn, h, tokens) - v

    def chosen_value(self, q_fn, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """min_i Qbar_i(s, a) of the chosen tokens (B,): looked up among the candidates when computed,
        else `q_fn(h, tokens)` (a `Guide.q_fn`)."""
        if self.q is None:
            return q_fn(h, tokens.unsqueeze(1)).squeeze(1)
        if self.index is None:
            return self.q.gather(1, tokens.unsqueeze(1)).squeeze(1)
        match = self.index == tokens.unsqueeze(1)
        found = (self.q * match).sum(1)
        missing = ~match.any(1)  # e.g. padding fed to a finished row
        if missing.any():
            found = torch.where(missing, q_fn(h, tokens.unsqueeze(1)).squeeze(1), found)
        return found


class Guide:
    """Filter + the critic's advantage for one decoding call. `mode`: "sample" (the softmax of the scores is sampled),
    "greedy" (argmax), or "beam" (`beam_step`: beam search sums the per-step scores). `eta`: the critic's values are
    read as Q♯'s `Q_eta` (`tokenq.distributional`)."""

    def __init__(self, critic: TokenQModel, beta: float, mode: str = "sample", temperature: float | None = 1.0,
                 top_k: int | None = None, top_p: float | None = None, exact_hf: bool = False, num_beams: int = 1,
                 eta: float | None = None) -> None:
        self.critic, self.beta, self.mode = critic, float(beta), mode
        self.q_fn, self.v_fn = critic.decoding_q(eta), critic.decoding_v(eta)
        self.top_k = top_k or (None if mode == "sample" else max(SEARCH_TOP_K, 2 * num_beams))
        self.top_p = top_p if top_p is not None and top_p < 1.0 else None
        self.temperature = temperature if temperature not in (None, 1.0) else None
        self.filter = behaviour_filter(self.temperature, self.top_k, self.top_p)
        self.narrowing = bool(self.top_k) or self.top_p is not None
        self.exact_hf = exact_hf  # beta = 0 through HF's own warpers: token-for-token HF sampling

    def step(self, input_ids: torch.Tensor, scores: torch.Tensor, h: torch.Tensor) -> GuideStep:
        """scores (B, V): pi_beta's logits, h (B, H) -> `GuideStep` (sampling and greedy)."""
        sampling = self.mode == "sample"
        if self.beta == 0.0 and self.exact_hf:
            zero = torch.zeros(scores.shape[0], device=scores.device) if sampling else None
            return GuideStep(self.filter(input_ids, scores), zero, None, None)
        filtered, values, index = self._filter_with_candidates(input_ids, scores)
        if self.beta == 0.0:
            zero = torch.zeros(scores.shape[0], device=scores.device) if sampling else None
            return GuideStep(filtered, zero, index, None)
        q, v = self.q_fn(h, index), self.v_fn(h)
        adv = self.beta * (q - v.unsqueeze(-1))
        if index is None:
            guided = filtered + adv
            kl = kl_divergence(guided, filtered) if sampling else None
        else:
            guided = filtered.scatter_add_(-1, index, adv)  # in place on our own copy; -inf + finite stays -inf
            kl = kl_divergence(values + adv, values) if sampling else None
        return GuideStep(guided, kl, index, q, v)

    def _filter_with_candidates(self, input_ids, scores):
        """pi_beta's filter and its survivors (values, index (B, k)). With top-k, top-p runs on the k
        candidates only: the same rule as HF's TopPLogitsWarper (drop the tokens whose ascending cumulative
        probability is <= 1 - top_p, keep the top one) without sorting the whole vocabulary."""
        if not self.narrowing:
            return self.filter(input_ids, scores), None, None
        if not self.top_k:
            filtered = self.filter(input_ids, scores)  # a new tensor (HF's top-p warper masks out of place)
            values, index = filtered.topk(int(torch.isfinite(filtered).sum(-1).max()), dim=-1)
            return filtered, values, index
        if self.temperature is not None:
            scores = scores / self.temperature
        values, index = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)  # descending
        values = self._top_p(values)
        # exactly k survivors (HF's top-k warper also keeps exact ties of the k-th value)
        filtered = torch.empty_like(scores).fill_(float("-inf")).scatter_(-1, index, values)
        return filtered, values, index

    def _top_p(self, values: torch.Tensor) -> torch.Tensor:
        """HF's TopPLogitsWarper on descending candidates (B, k): drop those whose ascending cumulative
        probability is <= 1 - top_p, keep the top one."""
        if self.top_p is None:
            return values
        ascending_mass = torch.softmax(values, -1).flip(-1).cumsum(-1).flip(-1)
        drop = ascending_mass <= 1 - self.top_p
        drop[..., 0] = False
        return values.masked_fill(drop, float("-inf"))

    def beam_step(self, input_ids, logits: torch.Tensor, h: torch.Tensor, processors, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search's guided scores of each row's candidates: logits (B, V), h (B, H) -> scores (B, k) and tokens
        (B, k); log pi_beta is HF beam search's: `log_softmax`, then the user's logits `processors`."""
        log_p = torch.log_softmax(logits, dim=-1)
        return self.beam_candidates(processors(input_ids, log_p) if processors else log_p, h, keep)

    def beam_candidates(self, log_p: torch.Tensor, h: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`log pi_beta(a|s) + beta * A(s, a)` on each row's candidates (-inf where top-k / top-p drop one), from HF
        beam search's scores `log_p` (B, V) (log-softmax, then the user's processors); a temperature renormalises.
        At least `keep` candidates (the continuations beam search keeps per step) are ranked."""
        if self.temperature is not None:
            log_p = torch.log_softmax(log_p / self.temperature, dim=-1)
        values, index = log_p.topk(min(max(self.top_k, keep), log_p.shape[-1]), dim=-1)
        values[:, self.top_k :] = float("-inf")
        values = self._top_p(values)
        if self.beta == 0.0:
            return values, index
        return values + self.beta * (self.q_fn(h, index) - self.v_fn(h).unsqueeze(-1)), index


class GuidanceProcessor(LogitsProcessor):
    """`Guide` as the last HF logits processor; `features(input_ids)` hands it the critic's features of each row's
    state (`tokenq.steering.hf_features`). Records per step the KL and, one step late (when the chosen token
    shows up in `input_ids`), the advantage of the token chosen in each row; `v0` is V of the prompts."""

    def __init__(self, guide: Guide, features) -> None:
        self.guide, self.features = guide, features
        self.kl: list[torch.Tensor] = []
        self.adv_chosen: list[torch.Tensor] = []
        self.v0: torch.Tensor | None = None
        self._last: tuple[GuideStep, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        h = self.features(input_ids)
        self._score_last(input_ids[:, -1])
        step = self.guide.step(input_ids, scores, h)
        if self.v0 is None:
            self.v0 = step.v if step.v is not None else self.guide.v_fn(h)
        self._last = (step._replace(scores=None), h)
        if step.kl is not None:
            self.kl.append(step.kl)
        return step.scores

    def _score_last(self, tokens: torch.Tensor) -> None:
        if self._last is not None:
            step, h = self._last
            self.adv_chosen.append(step.chosen_advantage(self.guide, h, tokens))

    def finish(self, sequences: torch.Tensor) -> None:
        """Score the last generated token, which no later processor call sees."""
        self._score_last(sequences[:, -1])
