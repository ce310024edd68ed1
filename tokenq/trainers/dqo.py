"""`DQOConfig` and `DQOTrainer`: Direct Q-function Optimization (Ji, Liu et al. 2024).

The LM is the Q-function: `Q_theta(s, a) = beta log(pi_theta / pi_ref)(a|s) + V_phi(s)`. The policy fits the
soft Bellman residual on the data's actions with clipped importance weights (`losses.dqo_policy_loss`);
V_phi (tokenq's V head on the policy's trunk: its gradient shapes the shared features) regresses on the
lambda-returns `G_t` of the data's rewards (lambda = 1: Monte-Carlo), i.e. it is the behaviour policy's value,
and the policy fits `beta log(pi / pi_ref)(a_t|s_t) = G_t - V(s_t)`: `pi ∝ pi_ref exp(A / beta)` on the
data's actions, a regularised improvement step over the behaviour policy. With lambda < 1 the target
bootstraps from V of later states (lambda = 0: the one-step soft Bellman target r + gamma V(s')).

Soft targets `r_t - beta log(pi_theta / pi_ref)(a_t|s_t)` for V are not identified off-policy: with data
covering one or two tokens per state, V(s) and the log-ratios of unseen tokens trade off freely (V(s)
enters both sides of its own target), and on arithmetic V diverged (mean 146 for returns <= 5).
Outcome and process rewards both sit in `rewards`. The reference is the policy's starting point, frozen:
with a LoRA backbone the same weights with the adapter disabled (one model in memory), otherwise a
frozen copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from tokenq.losses import action_logprob, dqo_policy_loss, masked_mean, mc_value_loss
from tokenq.mdp import action_positions
from tokenq.modeling import logits_at
from tokenq.returns import lambda_returns, next_state
from tokenq.trainers.base import TokenQTrainer, TokenQTrainingArguments


@dataclass
class DQOConfig(TokenQTrainingArguments):
    """Training arguments for DQO."""

    beta: float = field(default=0.1, metadata={"help": "KL strength: Q = beta log(pi / pi_ref) + V."})
    gamma: float = field(default=1.0, metadata={"help": "Discount per action token."})
    lam: float = field(default=1.0, metadata={"help": "lambda of the Bellman targets (1 = Monte-Carlo, 0 = one-step TD)."})
    max_weight: float = field(default=2.0, metadata={"help": "Clip of the importance weight pi_theta / pi_ref."})
    value_scale: float = field(default=1.0, metadata={"help": "Weight of the V loss."})

    def __post_init__(self) -> None:
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True  # the Q heads are not used by DQO
        super().__post_init__()


class DQOTrainer(TokenQTrainer):
    """Logs `loss/policy`, `loss/v`, `logratio/mean`, `weight/mean`, `v/mean`."""

    objective = "DQO (Ji, Liu et al. 2024): the LM as a soft Q-function, V on lambda-returns"
    card_tags = ("dqo",)
    trains_q = False  # the LM is the Q-function; the Q heads are not trained

    def __init__(self, model, args: DQOConfig, *a, ref_model=None, **kw):
        super().__init__(model, args, *a, **kw)
        self.shares_reference = ref_model is None and isinstance(model.backbone, PeftModel)
        if ref_model is None and not self.shares_reference:
            ref_model = copy.deepcopy(model.backbone)
        self.ref_model = None if ref_model is None else ref_model.requires_grad_(False).eval()

    @torch.no_grad()
    def reference_logits(self, model, inputs, acting: torch.Tensor) -> torch.Tensor:
        """pi_ref's logits at the action positions `acting` (B, T): (N, V), computed there only."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if self.ref_model is not None:
            with logits_at(self.ref_model, acting):
                return self.ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.backbone.disable_adapter(), logits_at(unwrapped.backbone, acting):
            return unwrapped.backbone(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: DQOConfig = self.args
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"], heads="value")
        acting = action_positions(inputs["action_mask"])
        logratio_t = action_logprob(out.logits_t, out.a_t) - action_logprob(self.reference_logits(model, inputs, acting), out.a_t)
        nxt = next_state(inputs["action_mask"], inputs["attention_mask"], inputs["terminated"])
        v_t = out.values[acting]
        g_t = lambda_returns(inputs["rewards"], out.values.detach(), nxt, inputs["action_mask"], args.gamma, args.lam)[acting]
        n = num_items_in_batch
        l_pi = dqo_policy_loss(logratio_t, v_t, g_t, beta=args.beta, max_weight=args.max_weight, num_items=n)
        l_v = mc_value_loss(v_t, g_t, num_items=n)
        total = self.global_scale(l_pi + args.value_scale * l_v, n)
        weight_t = torch.exp(logratio_t.detach()).clamp(max=args.max_weight)
        self.record(model, loss__policy=l_pi, loss__v=l_v, logratio__mean=masked_mean(logratio_t, num_items=n),
                    weight__mean=masked_mean(weight_t, num_items=n), v__mean=masked_mean(v_t, num_items=n))
        return (total, out) if return_outputs else total
