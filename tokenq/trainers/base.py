"""What every tokenq trainer shares: the data fields of its config, dataset preparation, per-term loss
logging, Polyak target updates once per optimiser step, checkpoints in `TokenQModel`'s own layout with
a model card (so `resume_from_checkpoint` restores backbone or adapter, heads and target heads exactly,
after checking that the checkpoint fits the model), and Hub pushes that upload that layout."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import HubStrategy, IntervalStrategy

from tokenq.atomic import replace_file, staged_folder
from tokenq.checkpoint import CONFIG_FILE, copy_model_files, read_config
from tokenq.diagnostics import PERMUTATIONS, dataset_diagnostics, flat_diagnostics
from tokenq.evaluation import training_rng_kept
from tokenq.mdp import TOKEN_COLUMNS, TokenCollator, check_reward_scale, normalize_rewards, tokenize_dataset
from tokenq.modeling import TokenQModel
from tokenq.trainers.guard import DivergenceGuard, check_finite_weights
from tokenq.trainers.resume import WholeCheckpoints


@dataclass
class TokenQTrainingArguments(TrainingArguments):
    """Fields shared by tokenq's trainers; every `TrainingArguments` field also applies."""

    gamma: float = field(default=0.99, metadata={"help": "Discount per action token."})
    max_length: int = field(default=1024, metadata={"help": "Cut longer sequences (marked truncated)."})
    reward_normalization: str = field(
        default="none", metadata={"help": "none | scale | zscore, from the dataset's episode returns (opt-in)."}
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the V / Q heads (fresh weights) when the backbone is pretrained "
                                "and should move more slowly (default: learning_rate for both)."}
    )
    target_update_alpha: float = field(
        default=0.001, metadata={"help": "Polyak rate: target <- alpha * online + (1 - alpha) * target."}
    )
    target_update_interval: int = field(
        default=1, metadata={"help": "Optimiser steps between Polyak updates of the target Q heads."}
    )
    max_nonfinite_steps: int = field(
        default=0, metadata={"help": "Optimiser steps with a NaN / inf loss term or gradient that may be skipped (their "
                                     "gradients dropped, no weight changed) before training stops with an error (0: the "
                                     "first one stops it)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs action_mask, rewards, terminated."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace what an earlier run left in output_dir (its model, checkpoints, rounds); "
                                 "without it such a folder is refused unless the run resumes (--resume_from_checkpoint)."}
    )

    def __post_init__(self) -> None:
        # `accelerate launch` with several processes on a machine without GPU starts processes that each
        # train alone on all the data (world size 1) unless the arguments say CPU: then they form one gloo
        # data-parallel group.
        # Likewise `--bf16 true` without a GPU: transformers refuses it unless told CPU, where bf16 autocast works.
        multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not self.use_cpu and not torch.cuda.is_available() and (multi_process or self.bf16):
            self.use_cpu = True
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


def model_trains_lm(model) -> bool:
    """Whether the LM (the backbone) of a possibly wrapped (DDP / FSDP) `TokenQModel` has trainable weights."""
    return getattr(model, "module", model).backbone_trainable


def prepare_dataset(dataset: Dataset, tokenizer, args: TokenQTrainingArguments,
                    stats: dict[str, float] | None = None) -> tuple[Dataset, dict[str, float]]:
    """Validate and tokenize a raw dataset (any row format); pass through tokenized ones. Rewards are normalised
    as `args.reward_normalization` says, with the statistics `stats` when given (held-out rows take the training
    data's), else with the dataset's own."""
    if set(TOKEN_COLUMNS) <= set(dataset.column_names):
        tokenized = dataset
    else:
        tokenized = tokenize_dataset(dataset, tokenizer, max_length=args.max_length)
    if args.reward_normalization == "none" and stats is None:
        check_reward_scale(tokenized)
    return normalize_rewards(tokenized, args.reward_normalization, stats)


_SUMMARY_FIELDS = ("learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "max_steps", "num_train_epochs", "seed", "bf16", "fp16")
logger = logging.getLogger(__name__)


class TokenQTrainer(WholeCheckpoints, Trainer):
    """Base trainer: subclasses implement `compute_loss` and report terms with `self.record(model, ...)`,
    and name their `objective` for the model card."""

    objective: str | None = None
    card_tags: tuple[str, ...] = ()
    trains_q: bool = True  # whether the objective trains the Q heads (the value diagnostics then report Q too)
    fits_return_distribution: bool = False  # whether it trains heads of a categorical return (--return_bins)

    def __init__(self, model: TokenQModel | None, args: TokenQTrainingArguments, train_dataset: Dataset, processing_class,
                 eval_dataset: Dataset | None = None, callbacks=None, guided_eval=None, **kwargs):
        """`model`: None with `model_init=fn(trial)` (Trainer's, for `hyperparameter_search`). `eval_dataset`: held-out rows (any data format, rewards normalised as the training data's): `evaluate`
        logs the loss terms and the value diagnostics on them (`value_diagnostics`). `guided_eval(model) -> {name:
        number}` (e.g. `tokenq.GuidedEval`): evaluation by decoding, run by `evaluate` on the main process."""
        self.guided_eval = guided_eval
        train_dataset, self.reward_stats = prepare_dataset(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset, _ = prepare_dataset(eval_dataset, processing_class, args, stats=self.reward_stats)
        kwargs.setdefault("data_collator", TokenCollator(processing_class.pad_token_id))
        if args.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {args.max_nonfinite_steps}")
        # The guard runs before the target update: a skipped step changes no weight, and the targets follow.
        self.target_updates = TargetUpdateCallback(model, args.target_update_alpha, args.target_update_interval)
        callbacks = [*(callbacks or []), DivergenceGuard(self, args.max_nonfinite_steps), self.target_updates]
        # Trainer refuses an eval_strategy without an eval_dataset; a guided evaluation needs none.
        strategy = args.eval_strategy
        if guided_eval is not None and eval_dataset is None:
            args.eval_strategy = IntervalStrategy.NO
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        args.eval_strategy = strategy
        if self.model.tokenq_config.return_bins and not self.fits_return_distribution:
            raise ValueError(f"--return_bins: heads of a categorical return distribution are trained by tokenq value "
                             f"(--value_loss categorical), not by {type(self).__name__}")
        # Losses are normalised by `num_items_in_batch` (the action tokens of the global batch, counted by
        # `_get_num_items_in_batch`), so Trainer must not divide them again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        # Loss terms: the current optimiser step's (`_step`), then those of the kept steps since the last log line.
        self._step: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._kept_steps = self._skipped_steps = 0
        self.last_logged_terms: dict[str, float] = {}
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._card: dict = {}
        self._failed_pushes: list[str] = []

    def call_model_init(self, trial=None):
        """Trainer's (`model_init`: a fresh model per hyperparameter trial, `tokenq tune`), the target updates then
        following the new model."""
        model = super().call_model_init(trial)
        self.target_updates.model = model
        return model

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer; with `head_learning_rate`, the heads' parameters in groups of their own at that rate
        (same weight decay), before the scheduler is built on it, so warm-up and decay apply to both rates.
        (`*args`: transformers 5.0 takes no `model` argument here, later releases do.)"""
        optimizer = super().create_optimizer(*args, **kwargs)
        rate = self.args.head_learning_rate
        if rate is None or rate == self.args.learning_rate:
            return optimizer
        heads = {id(p) for p in self.accelerator.unwrap_model(self.model).heads.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in heads]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in heads]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                           "lr": rate, "initial_lr": rate})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Action tokens in the micro-batches of one optimiser step, summed over all processes: what every
        token-mean term divides by (Trainer counts `labels`, which tokenq batches do not have)."""
        count = sum(batch["action_mask"].sum() for batch in batch_samples).to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def global_scale(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """DDP / FSDP / DeepSpeed average gradients over processes: a loss that is this process's share of
        the global-batch mean is multiplied by their number, so that the average is the global gradient."""
        return loss * self.accelerator.num_processes if num_items_in_batch is not None else loss

    def record(self, model, **terms: torch.Tensor) -> None:
        """Keep loss terms for the next log line (`loss/q` etc.; pass names with `__` for `/`). In training each
        term is this micro-batch's share of its global-batch value (normalised by `num_items_in_batch`):
        `log` sums them over micro-batches and processes and averages over the optimiser steps since the
        last log line, so logged terms are global-batch values, whatever the batching."""
        metrics = self._step if model.training else self._metrics["eval"]
        for name, value in terms.items():
            metrics[name.replace("__", "/")].append(value.detach().float())

    def training_step(self, *args, **kwargs) -> torch.Tensor:
        """Trainer's step; a non-finite loss is recorded for `DivergenceGuard` (as the term `loss`) and handed to
        Trainer as 0, so that Trainer's running mean never averages a diverged value in (its log would show 0)."""
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss):
            self._step["loss"].append(loss.detach().float())
            return torch.zeros_like(loss)
        return loss

    def step_terms(self) -> dict[str, list[torch.Tensor]]:
        """The loss terms recorded during the current optimiser step (all its micro-batches)."""
        return self._step

    def keep_step(self, kept: bool) -> None:
        """File the current step's terms into the next log line (`kept`), or drop them (a skipped step)."""
        if kept:
            for name, values in self._step.items():
                self._metrics["train"][name].extend(values)
            self._kept_steps += 1
        else:
            self._skipped_steps += 1
        self._step = defaultdict(list)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss terms on `eval_dataset` (when there is one) and the guided evaluation (when given), both logged
        with `self.log`, so that `report_to` backends and `state.log_history` get them."""
        with training_rng_kept(self.args.device):  # an evaluation (its data loader draws a seed) must not move them
            return self._evaluate_all(eval_dataset, ignore_keys, metric_key_prefix)

    def _evaluate_all(self, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict[str, float]:
        metrics = {}
        held_out = eval_dataset is not None or self.eval_dataset is not None
        if held_out:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if self.is_world_process_zero() and not self.sharded:  # sharded: on the saved checkpoint at the end
                # the figures of the curve; the chance bound is the verdict's, at the end of the run
                diagnostics = flat_diagnostics(self.value_diagnostics(eval_dataset, permutations=0))
                metrics.update({f"{metric_key_prefix}_{k}": v for k, v in diagnostics.items()})
                self.log({f"{metric_key_prefix}_{k}": v for k, v in diagnostics.items()})
        if self.guided_eval is not None:
            if self.is_world_process_zero():
                guided = self.guided_eval(self.accelerator.unwrap_model(self.model))
                metrics.update({f"{metric_key_prefix}_{k}": v for k, v in guided.items()})
                self.log({f"{metric_key_prefix}_{k}": v for k, v in guided.items()})
            if not held_out:  # else super().evaluate announced it
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @property
    def sharded(self) -> bool:
        """Whether training shards the weights across processes (FSDP, DeepSpeed ZeRO-3): then no process holds a
        whole model to decode or diagnose with during training."""
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    def value_diagnostics(self, eval_dataset: Dataset | None = None, model: TokenQModel | None = None,
                          permutations: int = PERMUTATIONS) -> dict:
        """`tokenq.diagnostics.value_diagnostics` of `model` (default: the trainer's, unwrapped) on the held-out rows
        (`eval_dataset`, raw or tokenized; default the trainer's): TD error, expectile residual, and how well V(s_0)
        and Q at the data's actions predict the realised returns, with the chance bound of `permutations` shuffles
        (0: none). Runs on the calling process alone."""
        dataset = self.eval_dataset if eval_dataset is None else prepare_dataset(
            eval_dataset, self.processing_class, self.args, stats=self.reward_stats)[0]
        if dataset is None:
            raise ValueError("value_diagnostics needs held-out rows: pass eval_dataset to the trainer or to this call")
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        return dataset_diagnostics(model, dataset, self.data_collator, self.args.gamma, getattr(self.args, "tau", 0.5),
                                   with_q=self.trains_q, batch_size=self.args.per_device_eval_batch_size,
                                   permutations=permutations)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        terms = self._metrics[mode]
        if terms:  # every process records the same terms at the same steps, so the reduction below matches
            names = sorted(terms)
            values = torch.stack([torch.stack(terms[n]).sum() for n in names]).to(self.args.device)
            if mode == "train":  # the steps this process ran since the last log line (a resumed run counts from its start)
                values = values / max(1, self._kept_steps)
            else:
                values = values / len(terms[names[0]])
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="sum" if mode == "train" else "mean")
            logs.update({("eval_" if mode == "eval" else "") + n: v for n, v in zip(names, values.tolist())})
            if mode == "train":
                self.last_logged_terms = {n: round(v, 6) for n, v in zip(names, values.tolist())}
        terms.clear()
        if mode == "train":
            if self._skipped_steps:  # Trainer averaged the skipped steps in as 0: the mean of the kept ones
                logs["skipped_steps"] = self._skipped_steps
                if "loss" in logs and self._kept_steps:
                    logs["loss"] = logs["loss"] * (self._kept_steps + self._skipped_steps) / self._kept_steps
                else:
                    logs.pop("loss", None)
            self._kept_steps = self._skipped_steps = 0
        super().log(logs, start_time)

    # ---- checkpoints, model card, Hub --------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:  # frozen weights cannot diverge: the trained ones and the heads are checked
            check_finite_weights(state_dict if state_dict is not None else {
                n: p for n, p in model.named_parameters() if p.requires_grad or n.startswith("heads.")}, output_dir)
        # Under FSDP (full state dict) and ZeRO-3 Trainer hands over the state dict gathered from the shards.
        def write(folder) -> None:
            model.save_pretrained(folder, tokenizer=self.processing_class, is_main_process=self.args.should_save,
                                  state_dict=state_dict, model_card_kwargs=self.model_card_kwargs())
            if self.args.should_save:
                replace_file(Path(folder) / "training_args.bin", lambda tmp: torch.save(self.args, tmp))

        if self.args.should_save and not Path(output_dir).exists():  # a new folder appears whole, or not at all
            with staged_folder(output_dir) as tmp:
                write(tmp)
        else:
            write(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_checkpoint_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_checkpoint_weights(self.state.best_model_checkpoint)

    def model_card_kwargs(self) -> dict:
        """What the model card says of this run (see `tokenq.card.build_model_card`)."""
        args = self.args
        own = {f.name for f in fields(TrainingArguments)}
        training = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in own}
        training.update({name: getattr(args, name) for name in _SUMMARY_FIELDS})
        if args.max_steps > 0:  # max_steps overrides the epoch count
            training.pop("num_train_epochs")
        training.update(processes=args.world_size, optimizer_steps_done=self.state.global_step)
        if args.reward_normalization != "none":  # the heads' units: a return G is learnt as scale * G + shift
            training.update(reward_scale=self.reward_stats["scale"], reward_shift=self.reward_stats["shift"])
        repo_id = getattr(self, "hub_model_id", None) or args.hub_model_id
        tags = [*self.card_tags, *self._card.get("tags", [])]
        return {"repo_id": repo_id, "model_name": (repo_id or Path(args.output_dir).name).split("/")[-1],
                "objective": self.objective, "training": training, **self._card, "tags": tags}

    def create_model_card(self, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                          tags: str | list[str] | None = None, results: dict | None = None,
                          example_prompt: str | None = None, **kwargs) -> None:
        """Write the model card to `output_dir/README.md` (trl's trainers do the same), remembering what is given
        for later saves and pushes: `dataset_name`, `tags`, `results` (`{"table", "metrics", "plots"}` as
        measured by a recipe) and an `example_prompt` for the card's snippet."""
        given = {"model_name": model_name, "example_prompt": example_prompt, "results": results,
                 "datasets": [dataset_name] if isinstance(dataset_name, str) else dataset_name,
                 "tags": [tags] if isinstance(tags, str) else tags}
        self._card.update({k: v for k, v in given.items() if v is not None})
        if not self.is_world_process_zero():
            return
        saved = Path(self.args.output_dir) / CONFIG_FILE  # the card describes the checkpoint saved there
        record = read_config(saved.parent) if saved.is_file() else None
        card = self.accelerator.unwrap_model(self.model).generate_model_card(record, **self.model_card_kwargs())
        replace_file(Path(self.args.output_dir) / "README.md", card.save)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer copies only transformers' own files (config, model weights, adapter) from the checkpoint to
        `output_dir` before uploading `output_dir`: copy tokenq's whole layout (heads, tokenq_config, card,
        base copy) so that the repo root is a loadable tokenq checkpoint after every push."""
        busy = not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done()
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END and not busy:
            copy_model_files(checkpoint_folder, self.args.output_dir)  # (Trainer skips the push when busy)
        super()._push_from_checkpoint(checkpoint_folder)
        for job in getattr(self.push_in_progress, "jobs", None) or []:
            if not getattr(job, "_tokenq_watched", False):
                job._tokenq_watched = True
                job.add_done_callback(self._report_push)

    def _report_push(self, job) -> None:
        """Trainer uploads checkpoints in the background and never looks at the result: say so when one fails."""
        if job.cancelled() or job.exception() is None:
            return
        message = f"push to the Hub repo {self.hub_model_id} failed: {job.exception()!r}"
        self._failed_pushes.append(message)
        logger.error("%s (the local checkpoints in %s are intact)", message, self.args.output_dir)

    def _finish_current_push(self) -> None:
        super()._finish_current_push()
        if self._failed_pushes:
            failures, self._failed_pushes = self._failed_pushes, []
            logger.error(
                "%d push(es) to the Hub failed during training (local checkpoints in %s are intact; the final push, "
                "or `TokenQModel.from_pretrained(dir).push_to_hub(repo_id)`, uploads them again):\n  %s",
                len(failures), self.args.output_dir, "\n  ".join(failures),
            )
            self.push_failures = failures
