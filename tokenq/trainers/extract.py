"""Policy extraction from a trained, frozen critic: `AWRTrainer` (advantage-weighted regression, IQL's own
extraction) and `BestOfNTrainer` (Digi-Q's best-of-N). Both train the LM of a `TokenQModel` wrapping the policy
(its heads frozen and unused: the checkpoints keep tokenq's layout, so a stopped run resumes exactly) on the
data's states; the critic (a `TokenQModel` from `tokenq iql` / `tokenq value`) is read under `no_grad` and never
trained. The third method, search-to-preferences + DPO (Agent Q), trains with trl's `DPOTrainer`
(`tokenq.extraction`). `tokenq.extraction.extract` builds them; `tokenq extract` runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenq.losses import awr_loss, best_of_n_loss, best_of_n_targets, masked_mean
from tokenq.mdp import action_positions
from tokenq.modeling import TokenQModel
from tokenq.trainers.base import TokenQTrainer

METHODS = ("awr", "best_of_n", "dpo")


@dataclass
class ExtractionArguments:
    """How a policy is extracted from a critic (`tokenq extract`, `tokenq iterate`)."""

    method: str = field(default="awr", metadata={"help": "awr | best_of_n | dpo."})
    awr_temperature: float = field(
        default=0.1, metadata={"help": "awr: weight exp(A / temperature), A = Q - V in the critic's reward units."})
    awr_max_weight: float = field(default=20.0, metadata={"help": "awr: clip of the weight."})
    num_candidates: int = field(
        default=4, metadata={"help": "best_of_n: tokens sampled from the policy at each state; dpo: continuations per node."})
    candidate_temperature: float = field(default=1.0, metadata={"help": "best_of_n / dpo: the policy's sampling temperature."})
    candidate: str = field(
        default="token", metadata={"help": "best_of_n: a candidate is a token, sampled at every state of the data while "
                                   "training (token), or a step up to the task's step end, sampled at every step "
                                   "boundary of the data before training and ranked by the critic's value score (step)."})
    rank_by: str = field(
        default="value", metadata={"help": "dpo: rank a node's continuations by the critic's value score of their first "
                                   "step (value: summed advantages), or by the task's reward of the rollout (reward)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "dpo: DPO's beta (trl DPOConfig.beta)."})
    xpo_alpha: float = field(
        default=0.0, metadata={"help": "dpo: XPO's exploration term (Xie et al. 2024): + alpha * log pi(y | x) of a reference "
                               "policy sample y (here the chosen rollout, a sample of the policy the round starts from), "
                               "trl's 'sft' loss with weight -alpha (a token mean; 0: plain DPO)."})
    dpo_prompts: int | None = field(default=None, metadata={"help": "dpo: search at most this many training prompts."})
    merge_lora: bool = field(
        default=True, metadata={"help": "With --use_peft: save the policy with the adapter merged (True), or as an adapter."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.candidate not in ("token", "step"):
            raise ValueError(f"--candidate must be token or step, got {self.candidate!r}")
        if self.rank_by not in ("value", "reward"):
            raise ValueError(f"--rank_by must be value or reward, got {self.rank_by!r}")
        if self.xpo_alpha < 0:
            raise ValueError(f"--xpo_alpha must be >= 0, got {self.xpo_alpha}")
        for name in ("awr_temperature", "awr_max_weight", "candidate_temperature", "dpo_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.num_candidates < 2 and self.method != "awr":
            raise ValueError(f"--num_candidates must be >= 2 for {self.method} (it ranks candidates), got {self.num_candidates}")


class ExtractTrainer(TokenQTrainer):
    """Shared by the extraction trainers: the frozen critic on the training device, read by `critic_features`."""

    trains_q = False

    def __init__(self, model: TokenQModel, args, train_dataset, processing_class, *, critic: TokenQModel,
                 extraction: ExtractionArguments, **kwargs):
        if not model.backbone_trainable:
            raise ValueError("the policy to extract has no trainable weights (a frozen or 4-bit backbone without LoRA)")
        model.heads.requires_grad_(False)  # the wrapper's heads are not part of the policy
        self.critic = critic.eval().requires_grad_(False)
        self.extraction = extraction
        super().__init__(model, args, train_dataset, processing_class, **kwargs)
        self.critic.to(self.args.device)

    def critic_features(self, inputs: dict) -> torch.Tensor:
        """The critic's features (B, T, H) of the batch (one forward, no gradient)."""
        return self.critic.features(inputs["input_ids"], inputs["attention_mask"])

    def policy_logits(self, model, inputs: dict):
        """The policy's LM logits at the action positions (N, V), the actions (N,) and the positions (B, T)."""
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"], heads="value")
        return out.logits_t, out.a_t, action_positions(inputs["action_mask"])


class AWRTrainer(ExtractTrainer):
    """`tokenq.losses.awr_loss` on the data's actions with the critic's advantages; logs `loss/awr`,
    `advantage/mean`, `weight/mean`."""

    objective = "policy extraction by advantage-weighted regression (IQL / AWR) from a frozen critic"
    card_tags = ("awr", "policy-extraction")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ex, n = self.extraction, num_items_in_batch
        logits_t, a_t, acting = self.policy_logits(model, inputs)
        h_t = self.critic_features(inputs)[acting]
        adv_t = self.critic.action_value(h_t, a_t) - self.critic.state_value(h_t)
        loss = awr_loss(logits_t, a_t, adv_t, ex.awr_temperature, ex.awr_max_weight, num_items=n)
        weight = torch.exp(adv_t / ex.awr_temperature).clamp(max=ex.awr_max_weight)
        self.record(model, loss__awr=loss, advantage__mean=masked_mean(adv_t, num_items=n),
                    weight__mean=masked_mean(weight, num_items=n))
        return self.global_scale(loss, n)


class BestOfNTrainer(ExtractTrainer):
    """`tokenq.losses.best_of_n_loss`: at each of the data's states `num_candidates` tokens sampled from the current
    policy, the critic's best one the target (with `candidate="step"` the rows are the best steps, drawn and ranked
    before training by `tokenq.extraction.best_step_rows`, and their tokens the targets); logs `loss/best_of_n`, `best_is_data/mean` (the share of states where the critic's best candidate is the data's
    own action)."""

    objective = "best-of-N policy extraction (Digi-Q) from a frozen critic"
    card_tags = ("best-of-n", "policy-extraction")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ex, n = self.extraction, num_items_in_batch
        logits_t, a_t, acting = self.policy_logits(model, inputs)
        if ex.candidate == "step":  # rows of best steps (`tokenq.extraction.best_step_rows`): their tokens are the targets
            loss = best_of_n_loss(logits_t, a_t.unsqueeze(-1), torch.zeros_like(a_t, dtype=torch.float).unsqueeze(-1),
                                  num_items=n)
            self.record(model, loss__best_of_n=loss)
            return self.global_scale(loss, n)
        with torch.no_grad():
            probs = torch.softmax(logits_t.float() / ex.candidate_temperature, dim=-1)
            candidates = torch.multinomial(probs, ex.num_candidates, replacement=True)  # (N, num_candidates)
            q = self.critic.candidate_values(self.critic_features(inputs)[acting], candidates)
        loss = best_of_n_loss(logits_t, candidates, q, num_items=n)
        best = best_of_n_targets(candidates, q)
        self.record(model, loss__best_of_n=loss, best_is_data__mean=masked_mean((best == a_t).float(), num_items=n))
        return self.global_scale(loss, n)
