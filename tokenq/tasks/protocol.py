"""The task protocol: what evaluation, sweeps, learning curves, plots, `metrics.json` and model cards read.

A task is anything with these members (a `typing.Protocol`: no base class to inherit):

- `name: str` — how results, logs and cards name it.
- `max_new_tokens: int` — the decoding budget of one completion.
- `eval_prompts() -> list[str]` — the evaluation prompts, as text the tokenizer reads.
- `score(prompts, completions) -> dict[str, list[float]]` — one number per completion under each key; `reward`
  is required (what every table, plot and `eval_reward` log reports), any other key is a named extra metric
  (randomwalks: `optimality`, `length`, `reached`; arithmetic: `steps_correct`), averaged and reported beside it.
- `behavior_reward() -> float | None` — the behaviour data's mean reward: the reference line of tables and plots.

Optional members, read with `getattr`:

- `answer(completion) -> str` — the final answer of a completion (for majority votes).
- `eval_dataset() -> datasets.Dataset` — held-out rows in a tokenq data format, for the value diagnostics
  (TD error, how well V and Q predict the realised return) logged at every evaluation.
- `step_stop_strings: tuple[str, ...]` — where a reasoning step ends (step search); else a step is a token.
- `process_rewards(prompts, completions) -> list[{"steps": [...], "step_rewards": [...]}]` — per completion its
  steps (joined, the completion) and a reward per step: `tokenq collect` then writes process-format rows.
- `behavior_rewards() -> list[float]` — the behaviour data's mean reward per evaluation prompt (in `eval_prompts()`
  order), when the data has rows for those prompts: the verdict then compares prompt by prompt.
- `prompt_add_special_tokens: bool` — False when `eval_prompts()` are already rendered with special tokens
  (a chat template); the tokenizer then adds none (default True, e.g. a BOS).

Built-in tasks (`tokenq.tasks.RandomWalks`, `tokenq.tasks.Arithmetic`) and a user's own data with a reward
function (`tokenq.tasks.DatasetTask`, `--dataset_name ... --reward_fn file.py:fn`) implement it alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Task(Protocol):
    name: str
    max_new_tokens: int

    def eval_prompts(self) -> list[str]: ...

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]: ...

    def behavior_reward(self) -> float | None: ...


def check_values(values, n: int, who: str, key: str = "reward", offset: int = 0) -> list[float]:
    """`values` as n finite floats, or a `ValueError` that names `who` (the function), `key` and the completion (its
    index, counted from `offset`)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise ValueError(f"{who} must return a list of {n} numbers for {key!r}, got {type(values).__name__}")
    values = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else list(values)
    if len(values) != n:
        raise ValueError(f"{who} returned {len(values)} values for {key!r} for {n} completions (one per completion)")
    for i, v in enumerate(values):
        if hasattr(v, "item") and not isinstance(v, numbers.Number):  # a 0-d tensor or numpy scalar
            v = v.item()
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):  # bools count as 0 / 1
            raise ValueError(f"{who} returned {v!r} for {key!r} of completion {offset + i}: every value must be a finite number")
        values[i] = float(v)
    return values


def checked_scores(task, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
    """`task.score(prompts, completions)`, checked: a dict with `reward`, every key n finite numbers."""
    scores = task.score(prompts, completions)
    who = f"task {getattr(task, 'name', type(task).__name__)!r}: score()"
    if not isinstance(scores, dict) or "reward" not in scores:
        raise ValueError(f"{who} must return a dict with the key 'reward' (other keys are named extras), got "
                         f"{type(scores).__name__}{' with keys ' + str(sorted(scores)) if isinstance(scores, dict) else ''}")
    return {key: check_values(values, len(prompts), who, key) for key, values in scores.items()}


def mean_scores(scores: dict[str, list[float]]) -> dict[str, float]:
    """The mean of every score key, `reward` first, then the task's extras in its order."""
    return {key: float(np.mean(scores[key])) for key in ["reward", *(k for k in scores if k != "reward")]}
