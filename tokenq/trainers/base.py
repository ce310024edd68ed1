"""What every tokenq trainer shares: the data fields of its config, dataset preparation, per-term loss
logging, Polyak target updates once per optimiser step, and checkpoints in `TokenQModel`'s own layout
(so `resume_from_checkpoint` restores backbone or adapter, heads and target heads exactly)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from tokenq.checkpoint import load_weights_in_place
from tokenq.mdp import TOKEN_COLUMNS, TokenCollator, normalize_rewards, tokenize_dataset
from tokenq.modeling import TokenQModel


@dataclass
class TokenQTrainingArguments(TrainingArguments):
    """Fields shared by tokenq's trainers; every `TrainingArguments` field also applies."""

    gamma: float = field(default=0.99, metadata={"help": "Discount per action token."})
    max_length: int = field(default=1024, metadata={"help": "Cut longer sequences (marked truncated)."})
    reward_normalization: str = field(
        default="none", metadata={"help": "none | scale | zscore, from the dataset's episode returns (opt-in)."}
    )
    target_update_alpha: float = field(
        default=0.001, metadata={"help": "Polyak rate: target <- alpha * online + (1 - alpha) * target."}
    )
    target_update_interval: int = field(
        default=1, metadata={"help": "Optimiser steps between Polyak updates of the target Q heads."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs action_mask, rewards, terminated."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})


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


def prepare_dataset(dataset: Dataset, tokenizer, args: TokenQTrainingArguments) -> tuple[Dataset, dict[str, float]]:
    """Validate and tokenize a raw dataset (any of the three row formats); pass through tokenized ones."""
    if set(TOKEN_COLUMNS) <= set(dataset.column_names):
        tokenized = dataset
    else:
        tokenized = tokenize_dataset(dataset, tokenizer, max_length=args.max_length)
    return normalize_rewards(tokenized, args.reward_normalization)


class TokenQTrainer(Trainer):
    """Base trainer: subclasses implement `compute_loss` and report terms with `self.record(model, ...)`."""

    def __init__(self, model: TokenQModel, args: TokenQTrainingArguments, train_dataset: Dataset, processing_class,
                 eval_dataset: Dataset | None = None, callbacks=None, **kwargs):
        train_dataset, self.reward_stats = prepare_dataset(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset, _ = prepare_dataset(eval_dataset, processing_class, args)
        kwargs.setdefault("data_collator", TokenCollator(processing_class.pad_token_id))
        callbacks = [*(callbacks or []), TargetUpdateCallback(model, args.target_update_alpha, args.target_update_interval)]
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean; Trainer scales for GA
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, model, **terms: torch.Tensor) -> None:
        """Keep loss terms for the next log line (`loss/q` etc.; pass names with `__` for `/`)."""
        metrics = self._metrics["train" if model.training else "eval"]
        for name, value in terms.items():
            metrics[name.replace("__", "/")].append(value.detach().float().item())

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(
            output_dir, tokenizer=self.processing_class, is_main_process=self.args.should_save
        )
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights_in_place(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
