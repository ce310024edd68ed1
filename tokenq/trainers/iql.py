"""`IQLConfig` and `IQLTrainer`: ILQL (Snell et al. 2022) / IQL (Kostrikov et al. 2021) on the token-level MDP."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenq.losses import iql_loss, masked_mean
from tokenq.mdp import action_positions
from tokenq.returns import discounted_returns, gather_next, next_state, td_target
from tokenq.trainers.base import TokenQTrainer, TokenQTrainingArguments, model_trains_lm


@dataclass
class IQLConfig(TokenQTrainingArguments):
    """Training arguments for ILQL / IQL. The defaults of the objective are the settings measured to hold across
    tasks (configs/iql_dataset.yaml, README "Your own task"; the randomwalks graphs 20-29): returns z-scored,
    expectile 0.9, no discount, Polyak rate 0.1 every 5 optimiser steps. trlx's ILQL defaults, for reference:
    tau 0.7, gamma 0.99, raw rewards, Polyak 0.001 every step (with which graphs 23 and 27 reached 0.77)."""

    reward_normalization: str = field(
        default="zscore", metadata={"help": "none | scale | zscore, from the dataset's episode returns (trlx: zscore)."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount per action token (trlx: 0.99)."})
    tau: float = field(default=0.9, metadata={"help": "Expectile of the V loss (0.5 = mean; -> 1 = max over data; trlx: 0.7)."})
    cql_scale: float = field(default=0.1, metadata={"help": "Weight of the CQL(H) term on the Q heads."})
    awac_scale: float = field(default=1.0, metadata={"help": "Weight of the policy (BC / AWAC) term on the LM."})
    awac_beta: float = field(
        default=0.0,
        metadata={"help": "AWAC temperature: weight = exp(awac_beta * (Qbar - V)). 0 = plain behaviour cloning, "
                  "which keeps the LM the behaviour policy pi_beta that ILQL's guided decoding assumes."},
    )
    awac_max_weight: float = field(default=20.0, metadata={"help": "Clip of the AWAC weight."})
    target_update_alpha: float = field(
        default=0.1, metadata={"help": "Polyak rate: target <- alpha * online + (1 - alpha) * target (trlx: 0.001)."}
    )
    target_update_interval: int = field(
        default=5, metadata={"help": "Optimiser steps between Polyak updates of the target Q heads (trlx: 1)."}
    )
    mc_lower_bound: bool = field(
        default=False,
        metadata={"help": "Q-Transformer's trick for sparse rewards: TD target = max(r + gamma V(s'), Monte-Carlo "
                  "return of the data), as the data's returns lower-bound the values of the optimal policy."},
    )

    def __post_init__(self) -> None:
        # With the policy term every trainable parameter gets a gradient: DDP can skip its search for unused
        # ones (Trainer turns it on for any model that is not a PreTrainedModel). Without it an untied LM
        # head gets no gradient, and DDP with find_unused_parameters=False fails at the first backward.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = self.awac_scale == 0
        super().__post_init__()


class IQLTrainer(TokenQTrainer):
    """Trains a `TokenQModel` with `tokenq.losses.iql_loss`; logs `loss/q`, `loss/v`, `loss/cql`,
    `loss/awac`, `q/mean`, `v/mean` next to the total."""

    objective = "ILQL / IQL (expectile V, TD twin Q, CQL, AWAC; Snell et al. 2022)"
    card_tags = ("ilql", "iql")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: IQLConfig = self.args
        awac_scale = args.awac_scale if model_trains_lm(model) else 0.0  # a frozen LM's CE is a constant
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"], heads="iql",
                    lm_logits=bool(awac_scale), q_logsumexp=bool(args.cql_scale))
        acting = action_positions(inputs["action_mask"])
        nxt = next_state(inputs["action_mask"], inputs["attention_mask"], inputs["terminated"])
        v_tp1 = gather_next(out.values.detach(), nxt)[acting]
        g_t = None
        if args.mc_lower_bound:
            g_t = discounted_returns(inputs["rewards"], inputs["action_mask"], args.gamma)[acting]
        y_t = td_target(inputs["rewards"][acting], v_tp1, nxt.bootstrap[acting], args.gamma, lower_bound_t=g_t)
        v_t = out.values[acting]
        losses = iql_loss(
            out.q_t, out.q_lse_t, out.target_q_t, v_t, y_t, out.logits_t, out.a_t,
            tau=args.tau, cql_scale=args.cql_scale, awac_scale=awac_scale,
            awac_beta=args.awac_beta, awac_max_weight=args.awac_max_weight, num_items=num_items_in_batch,
        )
        self.record(model, loss__q=losses.q, loss__v=losses.v, loss__cql=losses.cql, loss__awac=losses.awac,
                    q__mean=masked_mean(out.target_q_t.min(0).values, num_items=num_items_in_batch),
                    v__mean=masked_mean(v_t, num_items=num_items_in_batch))
        total = self.global_scale(losses.total, num_items_in_batch)
        return (total, out) if return_outputs else total
