"""Q-guided decoding on top of Hugging Face `generate`.

Guided sampling (ILQL, Snell et al. 2022, eq. 9, with the filter first): the behaviour policy's logits are
filtered first (temperature, top-k, top-p: HF's own warpers, in HF's order), then every surviving token
gets `+ beta * (Q(s, a) - V(s))`, so `pi(a|s) ∝ pi_beta_filtered(a|s) * exp(beta * A(s, a))`. Filtering
first keeps the guided policy inside pi_beta's support (trlx filters after adding the advantage, which
lets a large beta pick tokens pi_beta never emits).

The guidance is a `LogitsProcessor` placed after the warpers; HF's own warpers are switched off
(`temperature=1`, `top_k=0`, `top_p=1`), so `beta = 0` is exactly HF sampling, token for token under the
same seed. The heads read the hidden state that `TokenQModel`'s hook stored during the very forward pass
`generate` ran: one backbone forward per token, KV cache, batching and left padding as in `generate`.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenq.modeling import TokenQModel


class AdvantageGuidance(LogitsProcessor):
    """Adds `beta * A(s, a)` to the scores of the tokens still finite after filtering.

    Q is evaluated only on those candidates (a gather of their unembedding rows for the low-rank head),
    on the whole vocabulary only when nothing was filtered out.
    """

    def __init__(self, model: TokenQModel, beta: float) -> None:
        self.model, self.beta = model, float(beta)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        h = self.model.pop_features()[:, -1]  # (B, H): the state whose next token is being chosen
        if self.beta == 0.0:
            return scores
        n_candidates = int(torch.isfinite(scores).sum(-1).max())
        if n_candidates == scores.shape[-1]:
            return scores + self.beta * self.model.advantage(h).to(scores.dtype)
        index = scores.topk(n_candidates, dim=-1).indices  # (B, k): all finite entries of every row
        adv = self.model.advantage(h, index).to(scores.dtype)
        return scores.scatter_add(-1, index, self.beta * adv)  # -inf + finite stays -inf


def behaviour_filter(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> LogitsProcessorList:
    """pi_beta's sampling filter as HF builds it (same classes, same order as `GenerationMixin`)."""
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors


@torch.no_grad()
def guided_sample(
    model: TokenQModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Sample from `pi_beta_filtered * exp(beta * A)`; returns `generate`'s sequences (B, T + new).

    `input_ids` left-padded (B, T); other keyword arguments (`max_new_tokens`, `eos_token_id`,
    `pad_token_id`, `stopping_criteria`, `streamer`, ...) go to HF `generate` unchanged.
    """
    was_training = model.training
    model.eval()
    processors = behaviour_filter(temperature, top_k, top_p)
    processors.append(AdvantageGuidance(model, beta))
    try:
        return model.backbone.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            **generate_kwargs,
        )
    finally:
        model.train(was_training)
