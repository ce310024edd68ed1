"""`IQLConfig(TrainingArguments)` and `IQLTrainer(Trainer)`: ILQL / IQL on the token-level MDP.

The trainer only wires data, model outputs and the pure losses of `tokenq.losses` together; target
networks are updated by `TargetUpdateCallback.on_optimizer_step` (once per optimiser step, not per
micro-batch), and checkpoints use `TokenQModel.save_pretrained`, so `resume_from_checkpoint` restores
backbone (or adapter), heads and target heads exactly.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from tokenq.checkpoint import load_weights_in_place
from tokenq.losses import iql_loss
from tokenq.mdp import TOKEN_COLUMNS, TokenCollator, action_positions, normalize_rewards, tokenize_dataset
from tokenq.modeling import TokenQModel
from tokenq.returns import gather_next, next_state, td_target


@dataclass
class IQLConfig(TrainingArguments):
    """Training arguments for ILQL (Snell et al. 2022) / IQL (Kostrikov et al. 2021) on token-level MDPs.

    Defaults are trlx's ILQL defaults; every `TrainingArguments` field also applies.
    """

    tau: float = field(default=0.7, metadata={"help": "Expectile of the V loss (0.5 = mean; -> 1 = max over data)."})
    gamma: float = field(default=0.99, metadata={"help": "Discount per action token."})
    cql_scale: float = field(default=0.1, metadata={"help": "Weight of the CQL(H) term on the Q heads."})
    awac_scale: float = field(default=1.0, metadata={"help": "Weight of the policy (BC / AWAC) term on the LM."})
    awac_beta: float = field(
        default=0.0,
        metadata={"help": "AWAC temperature: weight = exp(awac_beta * (Qbar - V)). 0 = plain behaviour cloning, "
                  "which keeps the LM the behaviour policy pi_beta that ILQL's guided decoding assumes."},
    )
    awac_max_weight: float = field(default=20.0, metadata={"help": "Clip of the AWAC weight."})
    target_update_alpha: float = field(
        default=0.001, metadata={"help": "Polyak rate: target <- alpha * online + (1 - alpha) * target."}
    )
    target_update_interval: int = field(
        default=1, metadata={"help": "Optimiser steps between Polyak updates of the target Q heads."}
    )
    max_length: int = field(default=1024, metadata={"help": "Cut longer sequences (marked truncated)."})
    reward_normalization: str = field(
        default="none", metadata={"help": "none | scale | zscore, from the dataset's episode returns (opt-in)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs action_mask, rewards, terminated."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})

    def __post_init__(self) -> None:
        # Without the policy term an untied LM head gets no gradient, and DDP with
        # find_unused_parameters=False then fails at the first backward (NOTES.md).
        if self.awac_scale == 0 and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        super().__post_init__()


class TargetUpdateCallback(TrainerCallback):
    """Polyak-averages the target Q heads after every `interval`-th optimiser step.

    `on_optimizer_step` runs once per optimiser step; `training_step` would run once per micro-batch under
    gradient accumulation. `state.global_step` (steps completed before this one) keeps the schedule exact
    across `resume_from_checkpoint`.
    """

    def __init__(self, model: TokenQModel, alpha: float, interval: int) -> None:
        self.model, self.alpha, self.interval = model, alpha, interval

    def on_optimizer_step(self, args, state, control, **kwargs):
        if (state.global_step + 1) % self.interval == 0:
            self.model.update_targets(self.alpha)


def prepare_dataset(dataset: Dataset, tokenizer, args: IQLConfig) -> tuple[Dataset, dict[str, float]]:
    """Validate and tokenize a raw dataset (any of the three row formats); pass through tokenized ones."""
    if set(TOKEN_COLUMNS) <= set(dataset.column_names):
        tokenized = dataset
    else:
        tokenized = tokenize_dataset(dataset, tokenizer, max_length=args.max_length)
    return normalize_rewards(tokenized, args.reward_normalization)


class IQLTrainer(Trainer):
    """Trains a `TokenQModel` with `tokenq.losses.iql_loss`; logs `loss/q`, `loss/v`, `loss/cql`,
    `loss/awac`, `q/mean`, `v/mean` next to the total."""

    def __init__(self, model: TokenQModel, args: IQLConfig, train_dataset: Dataset, processing_class, eval_dataset: Dataset | None = None, callbacks=None, **kwargs):
        train_dataset, self.reward_stats = prepare_dataset(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset, _ = prepare_dataset(eval_dataset, processing_class, args)
        kwargs.setdefault("data_collator", TokenCollator(processing_class.pad_token_id))
        callbacks = [*(callbacks or []), TargetUpdateCallback(model, args.target_update_alpha, args.target_update_interval)]
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean; Trainer scales for GA
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: IQLConfig = self.args
        out = model(inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"])
        acting = action_positions(inputs["action_mask"])
        nxt = next_state(inputs["action_mask"], inputs["attention_mask"], inputs["terminated"])
        v_tp1 = gather_next(out.values.detach(), nxt)[acting]
        y_t = td_target(inputs["rewards"][acting], v_tp1, nxt.bootstrap[acting], args.gamma)
        v_t = out.values[acting]
        losses = iql_loss(
            out.q_all, out.target_q_t, v_t, y_t, out.logits_t, out.a_t,
            tau=args.tau, cql_scale=args.cql_scale, awac_scale=args.awac_scale,
            awac_beta=args.awac_beta, awac_max_weight=args.awac_max_weight,
        )
        metrics = self._metrics["train" if model.training else "eval"]
        for name, value in (("loss/q", losses.q), ("loss/v", losses.v), ("loss/cql", losses.cql),
                            ("loss/awac", losses.awac), ("q/mean", out.target_q_t.min(0).values.mean()),
                            ("v/mean", v_t.mean())):
            metrics[name].append(value.detach().item())
        return (losses.total, out) if return_outputs else losses.total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # ---- checkpoints: the whole TokenQModel, in its own layout -----------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(
            output_dir, tokenizer=self.processing_class, is_main_process=self.args.should_save
        )
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights_in_place(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
