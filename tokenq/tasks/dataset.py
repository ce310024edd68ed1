"""A user's own task: held-out rows in any tokenq data format and, optionally, a reward function.

`DatasetTask` implements the task protocol (`tokenq.tasks.protocol`) from data: its evaluation prompts are the
held-out rows' distinct prompts, its `score` the reward function (`--reward_fn`), its reference line the
held-out rows' own mean reward (their `reward` / `label` field; rows without one are scored by the reward
function), and its `eval_dataset` the rows themselves (value diagnostics need no reward function).
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np
from datasets import Dataset

from tokenq.mdp import STEP_SEPARATOR, detect_format
from tokenq.tasks.reward import RewardFunction


class Example(NamedTuple):
    prompt: str | list  # as in the row: text, or a list of messages
    completion: str  # the agent's text
    reward: float | None  # the row's own outcome reward, when it carries one


def row_example(row: dict, idx: int, fmt: str) -> Example:
    """The prompt, the completion text and the own outcome reward of one row of format `fmt`."""
    if fmt == "chat":
        messages = row["messages"]
        last = max((j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(f"row {idx}: field 'messages' has no assistant message to evaluate")
        return Example(messages[:last], messages[last]["content"], None)
    if fmt == "process":
        reward = row.get("reward")
        return Example(row["prompt"], "".join(row["steps"]), None if reward is None else float(reward))
    if fmt == "stepwise":
        return Example(row["prompt"], "".join(s + STEP_SEPARATOR for s in row["completions"]), None)
    completion = row["completion"]
    if isinstance(completion, list):  # conversational prompt-completion
        completion = "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    reward = float(row["label"]) if fmt == "preference" else float(row["reward"])
    return Example(row["prompt"], completion, reward)


def prompt_key(prompt: str | list) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_by_prompt(rows: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training rows, held-out rows): `fraction` of the distinct prompts (at least one) and all their rows are
    held out, so that no evaluation prompt was trained on."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval_split must be a fraction in (0, 1), got {fraction}")
    fmt = detect_format(rows.column_names)
    keys = [prompt_key(row_example(row, i, fmt).prompt) for i, row in enumerate(rows)]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        raise ValueError(f"--eval_split: the dataset has {len(distinct)} distinct prompt(s); holding out a share of "
                         "prompts needs at least 2 (or give --eval_dataset)")
    order = np.random.RandomState(seed).permutation(len(distinct))
    n_held = min(len(distinct) - 1, max(1, math.ceil(fraction * len(distinct))))
    held = {distinct[i] for i in order[:n_held]}
    held_rows = [i for i, k in enumerate(keys) if k in held]
    train_rows = [i for i, k in enumerate(keys) if k not in held]
    return rows.select(train_rows), rows.select(held_rows)


class DatasetTask:
    """The task protocol on held-out `rows` (a `datasets.Dataset` of any tokenq format) and `reward_fn`
    (any `fn(prompts, completions) -> list[float]`, see `tokenq.tasks.reward`; None: value diagnostics only).

    Conversational prompts (message lists) are rendered with the tokenizer's chat template for decoding; the
    reward function receives prompts as the rows hold them and completions as text (conversational rows:
    `[{"role": "assistant", "content": text}]`, trl's convention). `max_prompts` keeps the first distinct
    prompts; `max_new_tokens` defaults to the longest held-out completion in tokens, plus its EOS. `answer_fn(completion)
    -> str`, when given, is the task's `answer` (votes)."""

    def __init__(self, rows: Dataset, tokenizer, reward_fn=None, *, name: str = "dataset",
                 max_new_tokens: int | None = None, max_prompts: int | None = None, answer_fn=None) -> None:
        fmt = detect_format(rows.column_names)
        if len(rows) == 0:
            raise ValueError(f"task {name!r}: the held-out dataset has no rows")
        if reward_fn is not None and not isinstance(reward_fn, RewardFunction):
            reward_fn = RewardFunction(reward_fn, getattr(reward_fn, "__name__", repr(reward_fn)))
        self.name, self.reward_fn, self._rows = name, reward_fn, rows
        if answer_fn is not None:
            if not callable(answer_fn):
                raise ValueError(f"task {name!r}: answer_fn must be callable, got {type(answer_fn).__name__}")
            self.answer = answer_fn  # the protocol's optional `answer`
        self.examples = [row_example(row, i, fmt) for i, row in enumerate(rows)]
        kinds = {isinstance(e.prompt, list) for e in self.examples}
        if len(kinds) > 1:
            raise ValueError(f"task {name!r}: held-out prompts mix text and message lists; use one form")
        self.conversational = kinds == {True}
        self.prompt_add_special_tokens = not self.conversational  # a rendered chat template has its own
        self.rendered = [self._render(e.prompt, tokenizer) for e in self.examples]  # what the model reads
        self._original: dict[str, str | list] = {}
        for rendered, e in zip(self.rendered, self.examples):
            self._original.setdefault(rendered, e.prompt)
        self._prompts = list(self._original)[:max_prompts]
        if max_new_tokens is None:
            lengths = [len(tokenizer(e.completion, add_special_tokens=False).input_ids) for e in self.examples]
            max_new_tokens = max(lengths) + 1  # + EOS
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def _render(prompt: str | list, tokenizer) -> str:
        if isinstance(prompt, str):
            return prompt
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def eval_prompts(self) -> list[str]:
        return list(self._prompts)

    def eval_dataset(self) -> Dataset:
        return self._rows

    def originals(self) -> dict[str, str | list]:
        """Each evaluation prompt as the model reads it -> the prompt as the rows hold it (text or messages)."""
        return {p: self._original[p] for p in self._prompts}

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        if self.reward_fn is None:
            raise ValueError(f"task {self.name!r} has no reward function: give --reward_fn FILE.py:NAME to score completions")
        originals = [self._original.get(p, p) for p in prompts]
        if self.conversational:
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        return self.reward_fn(originals, completions)

    def _evaluated(self) -> tuple[list[str], list[Example]]:
        """The held-out rows of the evaluated prompts: (rendered prompts, examples)."""
        kept = set(self._prompts)
        pairs = [(r, e) for r, e in zip(self.rendered, self.examples) if r in kept]
        return [r for r, _ in pairs], [e for _, e in pairs]

    def behavior_reward(self) -> float | None:
        """The held-out rows' own reward, as the evaluation weighs prompts: the mean over the evaluated prompts of
        each prompt's mean (a prompt with many rows counts once). None when it cannot be known."""
        rewards = self.behavior_rewards()
        return None if rewards is None else float(np.mean(rewards))

    def behavior_rewards(self) -> list[float] | None:
        """Per evaluation prompt (`eval_prompts()` order) the mean own reward of its held-out rows: the verdict
        compares guided decoding with the data prompt by prompt. Rows without a reward field are scored by the
        reward function; None when neither is there."""
        prompts, examples = self._evaluated()
        if all(e.reward is not None for e in examples):
            rewards = [e.reward for e in examples]
        elif self.reward_fn is None:
            return None
        else:
            rewards = self.score(prompts, [e.completion for e in examples])["reward"]
        by_prompt: dict[str, list[float]] = {}
        for prompt, reward in zip(prompts, rewards):
            by_prompt.setdefault(prompt, []).append(reward)
        return [float(np.mean(by_prompt[p])) for p in self._prompts]

    def check(self, n: int = 4) -> None:
        """Call the reward function once on the first `n` held-out rows' own completions: an import, arity or
        value problem surfaces here, before any training step, naming the function."""
        if self.reward_fn is None:
            return
        self.score(self.rendered[:n], [e.completion for e in self.examples[:n]])
