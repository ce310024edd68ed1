"""The guided next-token scores shared by every decoding strategy.

pi_beta's logits are filtered first (temperature, top-k, top-p: HF's own warpers, in HF's order); the
surviving tokens then get `+ beta * A(s, a)` with `A = min_i Qbar_i(s, a) - V(s)` (ILQL, Snell et al.
2022, eq. 9, with the filter first so the guided policy never leaves pi_beta's support). Q is evaluated
only on the surviving candidates. `Guide.step` also returns the per-row KL(pi_guided || pi_beta) of that
step, where pi_beta is the filtered behaviour policy that plain sampling with the same settings uses.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tokenq.modeling import TokenQModel


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
    """KL(softmax(guided) || softmax(behaviour)) per row, over the tokens finite in both; (B, V) -> (B,)."""
    log_p = torch.log_softmax(guided, dim=-1)
    log_q = torch.log_softmax(behaviour, dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isfinite(guided), terms, torch.zeros_like(terms)).sum(-1)


class Guide:
    """Filter + advantage for one decoding call. `mode`: "sample" (softmax of the scores is sampled),
    "greedy" (argmax), or "beam" (scores are renormalised to log pi_beta over the support before the
    advantage is added, as HF beam search sums per-step scores)."""

    def __init__(self, model: TokenQModel, beta: float, mode: str = "sample", temperature: float | None = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> None:
        self.model, self.beta, self.mode = model, float(beta), mode
        self.filter = behaviour_filter(temperature, top_k, top_p)

    def step(self, input_ids: torch.Tensor, scores: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """scores (B, V) of pi_beta, h (B, H) features of the current states -> (guided scores, KL or None)."""
        filtered = self.filter(input_ids, scores)
        if self.mode == "beam":
            filtered = torch.log_softmax(filtered, dim=-1)
        if self.beta == 0.0:
            return filtered, (torch.zeros(scores.shape[0], device=scores.device) if self.mode == "sample" else None)
        guided = filtered + self.beta * self.advantage(h, filtered)
        kl = kl_divergence(guided, filtered) if self.mode == "sample" else None
        return guided, kl

    def advantage(self, h: torch.Tensor, filtered: torch.Tensor) -> torch.Tensor:
        """A(s, a) on the finite entries of `filtered` (0 elsewhere, where the scores stay -inf)."""
        n_candidates = int(torch.isfinite(filtered).sum(-1).max())
        if n_candidates == filtered.shape[-1]:
            return self.model.advantage(h).to(filtered.dtype)
        index = filtered.topk(n_candidates, dim=-1).indices  # (B, k): every finite entry of each row
        adv = self.model.advantage(h, index).to(filtered.dtype)
        return torch.zeros_like(filtered).scatter_(-1, index, adv)


class GuidanceProcessor(LogitsProcessor):
    """`Guide` as the last HF logits processor, reading the features `TokenQModel`'s hook stored during the
    forward pass `generate` just ran. Records per step the KL and, one step late (when the chosen token
    shows up in `input_ids`), the value score Q(s, a) of the token chosen in each row."""

    def __init__(self, guide: Guide) -> None:
        self.guide = guide
        self.kl: list[torch.Tensor] = []
        self.q_chosen: list[torch.Tensor] = []
        self._last_h: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        h = self.guide.model.pop_features()[:, -1]
        if self._last_h is not None:
            self.q_chosen.append(self.guide.model.action_value(self._last_h, input_ids[:, -1]))
        self._last_h = h
        guided, kl = self.guide.step(input_ids, scores, h)
        if kl is not None:
            self.kl.append(kl)
        return guided

    def finish(self, sequences: torch.Tensor) -> None:
        """Score the last generated token, which no later processor call sees."""
        if self._last_h is not None and self._last_h.shape[0] == sequences.shape[0]:
            self.q_chosen.append(self.guide.model.action_value(self._last_h, sequences[:, -1]))
