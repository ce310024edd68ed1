"""The two models of a guided decode: the policy gives the next-token logits, the critic the features its heads read.

The policy is any HF causal LM (full, LoRA, 4-bit); the critic a `TokenQModel`, usually on a smaller backbone with
the same tokenizer (Controlled Decoding, Mudgal et al. 2024; VAS, Han et al. 2024; Q♯, Zhou et al. 2025). Each
keeps its own KV cache and runs one forward per new token: the critic's forward computes no LM logits (its heads
read the hidden states only). A `TokenQModel` steering its own LM is the special case `shared`: one backbone
forward yields both.

Positions are passed explicitly to the critic (`position_ids` = count of real tokens so far, as HF `generate`
computes them for the policy), so both models see a left-padded prompt the same way.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from tokenq.backbone import base_model_of, cache_argument

if TYPE_CHECKING:  # tokenq.modeling imports tokenq.generation, which imports this module
    from tokenq.modeling import TokenQModel


def _name(model) -> str:
    return getattr(base_model_of(model).config, "name_or_path", "") or type(base_model_of(model)).__name__


def check_same_vocabulary(policy, critic: TokenQModel, policy_tokenizer=None, critic_tokenizer=None) -> None:
    """Refuse a critic that cannot read the policy's tokens: output embeddings of different sizes, or (when both are
    given) tokenizers with different vocabularies. The error names both models."""
    sizes = (policy.get_output_embeddings().weight.shape[0], critic.unembed.shape[0])
    problem = None
    if sizes[0] != sizes[1]:
        problem = f"vocabularies of {sizes[0]} and {sizes[1]} tokens"
    elif policy_tokenizer is not None and critic_tokenizer is not None and policy_tokenizer.get_vocab() != critic_tokenizer.get_vocab():
        differ = len(set(policy_tokenizer.get_vocab().items()) ^ set(critic_tokenizer.get_vocab().items()))
        problem = f"tokenizers that map {differ} (token, id) pairs differently"
    if problem:
        raise ValueError(f"the critic {_name(critic.backbone)!r} cannot steer the policy {_name(policy)!r}: they have {problem}. "
                         "A critic must be trained on a backbone with the policy's tokenizer")


def check_head_precision(critic: TokenQModel) -> None:
    """The value heads compute in float32 (they read any backbone's features cast to float32); heads cast to another
    precision (`critic.to(torch.bfloat16)`) are refused before decoding starts, naming the critic."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in critic.heads.parameters()})
    if dtypes != ["float32"]:
        raise ValueError(f"the critic {_name(critic.backbone)!r} has value heads in {', '.join(dtypes)}: tokenq's heads "
                         "compute in float32 (its backbone may be bf16 or 4-bit): cast them back with "
                         "critic.heads.float(), or cast only the backbone (critic.backbone.to(torch.bfloat16))")


@contextlib.contextmanager
def count_rows(module: torch.nn.Module):
    """Within the block, count the batch rows of every forward of `module` (compute accounting): yields a dict whose
    "rows" entry grows."""
    counter = {"rows": 0}

    def count(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counter["rows"] += 0 if ids is None else ids.shape[0]

    handle = base_model_of(module).register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


class Steering:
    """`policy` (an HF causal LM) and `critic` (a `TokenQModel`); `shared` when the critic's backbone is the policy."""

    def __init__(self, policy, critic: TokenQModel) -> None:
        self.policy, self.critic = policy, critic
        self.shared = critic.backbone is policy
        if not self.shared:
            check_same_vocabulary(policy, critic)
        check_head_precision(critic)
        self.policy_cache_argument = cache_argument(policy)
        self.critic_cache_argument = cache_argument(critic.backbone)

    @classmethod
    def of(cls, model, critic: TokenQModel | None) -> Steering:
        """`generate`'s two models: `model` a `TokenQModel` (its LM is the policy, its heads the critic unless
        `critic` is given) or any HF causal LM (then `critic` is required)."""
        from tokenq.modeling import TokenQModel

        if critic is not None and not isinstance(critic, TokenQModel):
            raise TypeError(f"critic must be a TokenQModel (a checkpoint of tokenq), got {type(critic).__name__}")
        if isinstance(model, TokenQModel):
            return cls(model.backbone, critic or model)
        if critic is None:
            raise ValueError(f"{type(model).__name__} has no value heads: pass critic= (a TokenQModel with the same "
                             "tokenizer), or decode it with its own generate()")
        return cls(model, critic)

    def critic_features(self, cache: DynamicCache, **inputs) -> torch.Tensor:
        """The critic's own forward on `inputs` (input_ids, attention_mask, position_ids), continuing its `cache`;
        no LM logits. Returns the features (R, H) of each row's last position."""
        from tokenq.modeling import logits_at

        with self.critic.reading_features() as tap, logits_at(self.critic.backbone, None):
            self.critic.backbone(**inputs, use_cache=True, **{self.critic_cache_argument: cache})
        return tap.pop()[:, -1]

    def forward(self, cache: DynamicCache, critic_cache: DynamicCache | None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of both models (one forward when shared): the policy's last logits (R, V) and the critic's
        features (R, H)."""
        with self.critic.reading_features() if self.shared else contextlib.nullcontext() as tap:
            out = self.policy(**inputs, use_cache=True, logits_to_keep=1, **{self.policy_cache_argument: cache})
        h = tap.pop()[:, -1] if self.shared else self.critic_features(critic_cache, **inputs)
        return out.logits[:, -1].float(), h


def explicit_positions(past_mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of new tokens (R, n): the count of real tokens before each, 0 on padding."""
    positions = past_mask.sum(1, keepdim=True) - 1 + new_mask.cumsum(1)
    return positions.masked_fill(new_mask == 0, 0)


class CriticStream:
    """The critic's features for the rows HF `generate` decodes (sampling, greedy, beam search), one critic forward
    per new token on its own KV cache. Called with each step's `input_ids` (R, L); when beam search reorders its rows,
    each row's parent is found among the previous step's rows of the same prompt (the row whose tokens it extends)
    and the critic's cache is reordered to match."""

    def __init__(self, steering: Steering, prompt_mask: torch.Tensor) -> None:
        self.steering, self.prompt_mask = steering, prompt_mask
        self.cache, self.mask, self.seen = DynamicCache(), None, None
        self.rows = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            new, self.mask = input_ids, self.prompt_mask.repeat_interleave(input_ids.shape[0] // self.prompt_mask.shape[0], 0)
            past = self.mask[:, :0]
        else:
            self._follow(input_ids[:, :-1])
            new, past = input_ids[:, -1:], self.mask
            self.mask = torch.cat([past, torch.ones_like(new)], 1)
        h = self.steering.critic_features(self.cache, input_ids=new, attention_mask=self.mask,
                                          position_ids=explicit_positions(past, self.mask[:, past.shape[1]:]))
        self.seen, self.rows = input_ids, self.rows + new.shape[0]
        return h

    def expand(self, n: int) -> None:
        """Each row becomes n rows (beam search's prompt, prefilled once)."""
        self.cache.batch_repeat_interleave(n)
        self.mask, self.seen = self.mask.repeat_interleave(n, 0), self.seen.repeat_interleave(n, 0)

    def _follow(self, previous: torch.Tensor) -> None:
        if torch.equal(previous, self.seen):
            return
        rows, group = len(previous), len(previous) // len(self.prompt_mask)
        same = (previous.unsqueeze(1) == self.seen.unsqueeze(0)).all(-1)  # (R now, R before)
        index = torch.arange(rows, device=previous.device) // group
        same &= index.unsqueeze(1) == index.unsqueeze(0)
        if not same.any(1).all():
            raise RuntimeError("the critic lost track of the policy's rows (a row extends no row of the previous step)")
        parents = same.int().argmax(1)
        self.cache.batch_select_indices(parents)
        self.mask = self.mask[parents]


class SharedFeatures:
    """The critic's features when it shares the policy's forward: read from the tap of the forward HF just ran."""

    def __init__(self, tap) -> None:
        self.tap = tap

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tap.pop()[:, -1]

    def expand(self, n: int) -> None:
        """Nothing to do: the policy's own cache is expanded by its decoding loop."""


@contextlib.contextmanager
def hf_features(steering: Steering, prompt_mask: torch.Tensor):
    """For decoding loops HF runs (`generate`): yields (features, policy_counter): `features(input_ids)` gives the
    critic's features (R, H) of each row's current state, `features.rows` a separate critic's forward rows and
    `policy_counter["rows"]` the policy's."""
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(count_rows(steering.policy))
        if steering.shared:
            yield SharedFeatures(stack.enter_context(steering.critic.reading_features())), counter
        else:
            yield CriticStream(steering, prompt_mask), counter
