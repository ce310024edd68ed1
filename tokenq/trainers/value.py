"""`ValueConfig` and `ValueTrainer`: Monte-Carlo value regression and Q-probes on the token-level MDP.

V(s_t) (and, as a Q-probe, Q(s_t, a_t)) regressed on the return-to-go of the data (CD-FUDGE, Yang & Klein
2021; Q-probes, Li et al. 2024; process reward models). Typically on a frozen backbone (the LM stays the
behaviour policy) and possibly on an intermediate layer with linear heads (`--head_layer k
--head_inner_size 0`). The target Q heads track the online ones (decoding reads the targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from tokenq.distributional import categorical_value
from tokenq.losses import categorical_value_loss, masked_mean, mc_value_loss
from tokenq.mdp import action_positions
from tokenq.returns import discounted_returns
from tokenq.trainers.base import TokenQTrainer, TokenQTrainingArguments, model_trains_lm


@dataclass
class ValueConfig(TokenQTrainingArguments):
    """Training arguments for Monte-Carlo value regression / Q-probes."""

    gamma: float = field(default=1.0, metadata={"help": "Discount per action token of the return-to-go."})
    value_loss: str = field(
        default="mse", metadata={"help": "mse; bce for 0/1 returns (heads then output logits of P(return = 1): the Bernoulli "
                                 "distribution of the return); categorical (with --return_bins K): the distribution of the "
                                 "return over K atoms (Q♯). Decoding reads E[return], or Q_eta with eta."}
    )
    train_q: bool = field(default=True, metadata={"help": "Also regress Q(s_t, a_t) on the return (a Q-probe)."})
    bc_scale: float = field(
        default=0.0, metadata={"help": "Weight of a behaviour-cloning loss on the LM (only with a trainable backbone)."}
    )
    target_update_alpha: float = field(default=1.0, metadata={"help": "Targets copy the online Q heads (1.0)."})

    def __post_init__(self) -> None:
        if self.value_loss not in ("mse", "bce", "categorical"):
            raise ValueError(f"value_loss must be mse, bce or categorical, got {self.value_loss!r}")
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True  # the LM head and unused heads get no gradient
        super().__post_init__()


class ValueTrainer(TokenQTrainer):
    """Logs `loss/v`, `loss/q`, `loss/bc`, `v/mean`, `return/mean`."""

    objective = "Monte-Carlo value regression / Q-probes (CD-FUDGE, Q-probe)"
    fits_return_distribution = True
    card_tags = ("q-probe", "value-regression")

    def __init__(self, model, args: ValueConfig, *a, **kw):
        bins = model.tokenq_config.return_bins
        if (args.value_loss == "categorical") != bool(bins):
            raise ValueError("--value_loss categorical and --return_bins K (>= 2) go together: the heads give the K "
                             f"probabilities the loss fits (got value_loss {args.value_loss!r}, return_bins {bins})")
        super().__init__(model, args, *a, **kw)
        model.tokenq_config.value_link = "sigmoid" if args.value_loss == "bce" else "identity"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: ValueConfig = self.args
        bc_scale = args.bc_scale if model_trains_lm(model) else 0.0  # a frozen LM's CE is a constant
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"], heads="probe", lm_logits=bool(bc_scale))
        acting = action_positions(inputs["action_mask"])
        g_t = discounted_returns(inputs["rewards"], inputs["action_mask"], args.gamma)[acting]
        v_t = out.values[acting]
        n = num_items_in_batch
        if args.value_loss == "categorical":  # v_t (N, K) logits, q_t (K, N): one head per atom
            atoms = self.model.return_atoms  # `model` may be wrapped (DDP)
            l_v = categorical_value_loss(v_t, g_t, atoms, num_items=n)
            l_q = categorical_value_loss(out.q_t.T, g_t, atoms, num_items=n) if args.train_q else g_t.new_zeros(())
            v_t = categorical_value(v_t.detach(), atoms)
        else:
            l_v = mc_value_loss(v_t, g_t, args.value_loss, num_items=n)
            l_q = mc_value_loss(out.q_t, g_t, args.value_loss, num_items=n) if args.train_q else v_t.new_zeros(())
        l_bc = (masked_mean(F.cross_entropy(out.logits_t.float(), out.a_t, reduction="none"), num_items=n)
                if bc_scale else v_t.new_zeros(()))
        total = self.global_scale(l_v + l_q + bc_scale * l_bc, n)
        self.record(model, loss__v=l_v, loss__q=l_q, loss__bc=l_bc, v__mean=masked_mean(v_t, num_items=n),
                    return__mean=masked_mean(g_t, num_items=n))
        return (total, out) if return_outputs else total
