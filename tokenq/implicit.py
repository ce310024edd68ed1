"""Implicit token-level rewards and Q from a policy / reference pair ("From r to Q*", Rafailov et al. 2024).

A DPO-trained policy is the optimal policy of a KL-regularised token MDP whose reward is, per token,
`r_t = beta log(pi / pi_ref)(a_t | s_t)` (their eq. 8), and whose Q satisfies `Q*(s, a) - V*(s) =
beta log(pi / pi_ref)(a | s)`. Here the rewards feed any tokenq objective (they replace a dataset's
`rewards`), and the implicit advantage steers decoding: `implicit_q_generate` decodes from the reference
(pi_beta: filtered first) with scores `log pi_ref + w * beta * log(pi / pi_ref)` on the candidates; at
`w = 1 / beta` that is the policy's own log-likelihood, i.e. search on `log pi_ref + r / beta`.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LogitsProcessor

from tokenq.backbone import cache_argument
from tokenq.generation import check_decoding_args, check_prompts
from tokenq.mdp import TokenCollator, action_positions


@torch.no_grad()
def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x[t+1] | x[0..t]) at every position t (B, T); the last column is 0."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([logp, torch.zeros_like(logp[:, :1])], dim=1)


@torch.no_grad()
def implicit_token_rewards(policy, reference, input_ids, attention_mask, action_mask, beta: float) -> torch.Tensor:
    """`r_t = beta (log pi(a_t|s_t) - log pi_ref(a_t|s_t))` at actions, 0 elsewhere: (B, T)."""
    ratio = token_log_probs(policy, input_ids, attention_mask) - token_log_probs(reference, input_ids, attention_mask)
    return beta * ratio * action_positions(action_mask)


def with_implicit_rewards(tokenized: Dataset, policy, reference, pad_token_id: int, beta: float, batch_size: int = 64) -> Dataset:
    """A tokenized dataset (`tokenq.mdp.tokenize_dataset`) whose `rewards` are the implicit token rewards,
    ready for `IQLTrainer` / `ValueTrainer` / `DQOTrainer`."""
    collate = TokenCollator(pad_token_id)
    device = next(policy.parameters()).device
    rewards: list[list[float]] = []
    for start in range(0, len(tokenized), batch_size):
        rows = [tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        r = implicit_token_rewards(policy, reference, batch["input_ids"], batch["attention_mask"], batch["action_mask"], beta)
        rewards += [r[i, : len(row["input_ids"])].tolist() for i, row in enumerate(rows)]
    return tokenized.remove_columns("rewards").add_column("rewards", rewards)


class _Lockstep:
    """Runs a second causal LM beside HF `generate` on the same tokens, with its own KV cache, and returns its
    next-token log-probs for the rows being scored. Beam search reorders rows between steps: each row's parent
    is found by matching its prefix with the previous step's rows."""

    def __init__(self, model, attention_mask: torch.Tensor) -> None:
        self.model, self.prompt_mask = model, attention_mask
        self.cache_argument = cache_argument(model)  # once, not per decoding step
        self.cache, self.prev, self.mask = None, None, None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.prev is None:
            rows = input_ids.shape[0]
            self.mask = self.prompt_mask.repeat_interleave(rows // self.prompt_mask.shape[0], dim=0)
            new, positions = input_ids, (self.mask.cumsum(1) - 1).clamp(min=0)
        else:
            parent = (input_ids[:, None, :-1] == self.prev[None]).all(-1).float().argmax(1)
            self.cache.batch_select_indices(parent)
            self.mask = torch.cat([self.mask[parent], torch.ones_like(self.mask[:, :1])], dim=1)
            new, positions = input_ids[:, -1:], self.mask.sum(1, keepdim=True) - 1
        out = self.model(input_ids=new, attention_mask=self.mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: self.cache})
        self.cache, self.prev = out[self.cache_argument], input_ids
        return torch.log_softmax(out.logits[:, -1].float(), -1)


class ImplicitQGuidance(LogitsProcessor):
    """Scores of the reference (pi_beta), restricted to its top-k, plus `weight * beta * log(pi / pi_ref)`."""

    def __init__(self, policy, attention_mask: torch.Tensor, beta: float, weight: float, top_k: int) -> None:
        self.policy_logp = _Lockstep(policy, attention_mask)
        self.beta, self.weight, self.top_k = beta, weight, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ref_logp = torch.log_softmax(scores.float(), -1)
        values, index = ref_logp.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        adv = self.beta * (self.policy_logp(input_ids).gather(-1, index) - values)
        return torch.full_like(ref_logp, float("-inf")).scatter_(-1, index, values + self.weight * adv)


@torch.no_grad()
def implicit_q_generate(policy, reference, input_ids, attention_mask=None, *, beta: float, weight: float | None = None,
                        top_k: int = 50, **generate_kwargs) -> torch.Tensor:
    """Decode from `reference` guided by the implicit advantage of `policy` (HF `generate` on the reference;
    `num_beams`, `do_sample`, stopping arguments pass through). `weight` defaults to `1 / beta`: the policy's
    log-likelihood within the reference's top-k. Returns the sequences."""
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    check_decoding_args(beta=beta, top_k=top_k, max_new_tokens=generate_kwargs.get("max_new_tokens", 20))
    check_prompts(reference, input_ids, attention_mask, generate_kwargs.get("max_new_tokens", 20))
    if generate_kwargs.get("do_sample"):  # HF's warpers would act after the guidance: the guidance filters
        generate_kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    guidance = ImplicitQGuidance(policy, attention_mask, beta, 1.0 / beta if weight is None else weight, top_k)
    return reference.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[guidance], **generate_kwargs)
