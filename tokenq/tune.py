"""Hyperparameter search for ILQL on the user's task (`tokenq tune`): the search space, the objective, and the two
backends that run it — `Trainer.hyperparameter_search` with Optuna when it is installed (`pip install tokenq[tune]`:
TPE sampling, Optuna's successive-halving pruner), else a built-in search with the same pruning rule (random
sampling), so that `tokenq tune` runs after the plain install.

The objective is cheap: the held-out value diagnostics (the rank correlation of Q at the data's actions with the
return-to-go, `eval_value/q_spearman`), read at the rung steps of successive halving and at a trial's last step;
no decoding while searching. A trial is stopped at a rung (`rungs`) when its objective is not among the top
1/`REDUCTION` of those recorded at that rung so far (its own included): most trials end after a ninth of the steps.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback, set_seed

from tokenq.modeling import build_model

OBJECTIVE = "eval_value/q_spearman"  # what the search maximises (undefined, e.g. constant Q: -1)
REDUCTION = 3  # successive halving: a third goes on at each rung
BACKBONES = ("full", "lora", "frozen")
MODEL_KEYS = ("backbone", "q_rank")  # sampled settings of the model, not of TrainingArguments / IQLConfig


@dataclass
class TuneArguments:
    """The search's budget and backend (`tokenq tune`)."""

    n_trials: int = field(default=20, metadata={"help": "Trials to run (fewer when --timeout ends the search first)."})
    timeout: float | None = field(default=None, metadata={"help": "Seconds after which no new trial starts."})
    backend: Literal["auto", "optuna", "builtin"] = field(
        default="auto", metadata={"help": "optuna (Trainer.hyperparameter_search), builtin (random sampling, the same "
                                  "pruning), or auto: optuna when it is installed."})
    eval_top: int = field(default=3, metadata={"help": "The best trials (by the objective) evaluated by decoding at the end; "
                                               "the winner is the best of them by guided reward."})
    search_seed: int = field(default=0, metadata={"help": "Seed of the sampler (the trials' own seed is --seed)."})

    def __post_init__(self) -> None:
        for name in ("n_trials", "eval_top"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")


def search_space(steps: int):
    """The space around a config of `steps` optimiser steps, as `hp_space(trial)` for `Trainer.hyperparameter_search`:
    learning rates of the model and of the heads, steps (half, as many, twice), the expectile tau, the backbone
    (full / LoRA / frozen) and the Q-head rank. Returns the `TrainingArguments` / `IQLConfig` fields; the model's
    settings (`MODEL_KEYS`) are read from `trial.params` by `trial_model`."""
    def space(trial) -> dict:
        trial.suggest_categorical("backbone", BACKBONES)
        trial.suggest_categorical("q_rank", [8, 16, 32, 64])
        return {"learning_rate": trial.suggest_float("learning_rate", 3e-5, 3e-3, log=True),
                "head_learning_rate": trial.suggest_float("head_learning_rate", 1e-4, 1e-2, log=True),
                "max_steps": trial.suggest_categorical("max_steps", [max(1, steps // 2), steps, 2 * steps]),
                "tau": trial.suggest_float("tau", 0.5, 0.95)}
    return space


class RandomTrial:
    """The built-in sampler: Optuna's `suggest_*` calls, answered uniformly (log-uniformly with `log=True`)."""

    def __init__(self, number: int, rng: random.Random) -> None:
        self.number, self.rng, self.params = number, rng, {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        value = math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high)
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices):
        self.params[name] = self.rng.choice(list(choices))
        return self.params[name]


def objective(metrics: dict) -> float:
    """The search's objective from `evaluate()`'s metrics."""
    value = metrics.get(OBJECTIVE)
    return -1.0 if value is None else float(value)


def rungs(steps: int) -> list[int]:
    """Successive halving's rung steps for trials of up to `2 * steps` (the config's `steps`): just over a ninth of
    them, x3, x9 — the last beyond `steps`, so that a trial of the config's length is never stopped at its end."""
    first = steps // REDUCTION**2 + 1
    return [first * REDUCTION**k for k in range(3)]


def settings_of(params: dict, model_args, head_config):
    """(model_args, head_config) of a trial: copies with its backbone mode and Q-head rank."""
    backbone = params.get("backbone", "lora" if model_args.use_peft else "frozen" if head_config.freeze_backbone else "full")
    return (replace(model_args, use_peft=backbone == "lora"),
            replace(head_config, freeze_backbone=backbone == "frozen", q_rank=params.get("q_rank", head_config.q_rank)))


def trial_model(run, scratch_config, params: dict):
    """A fresh model for a trial (`params`: the sampled settings; {} for the config's own), with the random streams as a
    plain run has them, so that `tokenq iql` with the winning settings trains the very same model on the very same
    batches: seeded before the model is built, and again after it (as `Trainer.__init__` reseeds after a plain run
    built its model; `Trainer.hyperparameter_search` builds it inside `train`, right before drawing the data order)."""
    model_args, head_config = settings_of(params, run.model_args, run.head_config)
    set_seed(run.train_args.seed)
    model = build_model(model_args, head_config, scratch_config, run.train_args.gradient_checkpointing)
    set_seed(run.train_args.seed)
    return model


class Rungs(TrainerCallback):
    """Evaluate (the value diagnostics: the objective) at the rung steps and at the last step, nowhere else."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps or state.global_step >= state.max_steps:
            control.should_evaluate = True


class Halving(TrainerCallback):
    """The built-in pruner (the rule of Optuna's `SuccessiveHalvingPruner`): at a rung a trial goes on when its
    objective is among the top max(1, n // REDUCTION) of the n values recorded there (`seen`, shared by trials)."""

    def __init__(self, steps: list[int], seen: dict[int, list[float]]) -> None:
        self.steps, self.seen, self.pruned = set(steps), seen, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if OBJECTIVE not in (logs or {}) or step not in self.steps or step >= state.max_steps:
            return
        value = objective(logs)
        values = sorted([*self.seen.setdefault(step, []), value], reverse=True)
        self.seen[step].append(value)
        if value < values[max(1, len(values) // REDUCTION) - 1]:
            self.pruned = control.should_training_stop = True


class Trials(TrainerCallback):
    """The record of every trial (both backends): its objective at its last evaluation, the steps it reached, its
    seconds, whether it ran to its last step; a finished trial's model is saved under `folder/trial-N` while it is
    among the `keep` best. `trainer`: the trainer that runs the trials (its live model is saved)."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep, self.records, self.trainer = folder, keep, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.close()  # a trial that raised never reached on_train_end
        self.records.append({"number": len(self.records), "start": time.time(), "objective": None, "steps": 0})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if OBJECTIVE in (logs or {}):  # the value diagnostics of an evaluation (logged by `TokenQTrainer.evaluate`)
            self.records[-1].update(objective=objective(logs), steps=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        record = self.close()
        record["finished"] = state.global_step >= state.max_steps and record["steps"] == state.global_step
        if record["finished"]:
            self.save(record)

    def close(self) -> dict | None:
        """End the last record's clock (once); returns it."""
        record = self.records[-1] if self.records else None
        if record is not None and "start" in record:
            record.update(seconds=time.time() - record.pop("start"), finished=False)
        return record

    def save(self, record: dict) -> None:
        """Keep the `keep` best finished models: this one when it is among them, then drop any that fell out."""
        finished = sorted((r for r in self.records if r["finished"]), key=lambda r: -r["objective"])
        if record in finished[: self.keep]:
            self.trainer.accelerator.unwrap_model(self.trainer.model).save_pretrained(self.folder / f"trial-{record['number']}")
        for r in finished[self.keep :]:
            shutil.rmtree(self.folder / f"trial-{r['number']}", ignore_errors=True)
