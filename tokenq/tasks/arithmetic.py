"""`arithmetic`: chains of single-digit additions modulo 10 written as running sums, with process rewards.

A prompt lists n digits, `3+5+9+2=`; the answer writes the running sum after each of them, one step per
digit, `3;8;7;9` (0+3, 3+5, 8+9 = 17 -> 7, 7+2), `;` ending a step and EOS ending the answer. The behaviour
policy writes each step correctly *given what it wrote before* with probability p (default 0.8) and
otherwise a uniformly random wrong digit, and continues from what it wrote. Rows carry the outcome reward
(1 if the final answer, the last step, is the true sum) and per-step process rewards (1 if the step is
correct given the previous ones): format 2 of the data model. The behaviour success rate is about p^n
(0.41 for n = 4; a little more, as a later mistake can land back on the true sum).

Evaluation prompts are held out: digit sequences that no training row uses. Metric: exact-answer accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from transformers import LlamaConfig, PreTrainedTokenizerFast

from tokenq.tasks.chartok import build_char_tokenizer


@dataclass
class Arithmetic:
    """The arithmetic task; `seed` draws the training data and the held-out evaluation prompts."""

    n_digits: int = 4
    p_correct: float = 0.8
    n_samples: int = 4000
    n_eval: int = 200
    seed: int = 0
    SEED_FIELD = "seed"  # the data seed `get_task(name, seed=...)` sets
    name: str = field(default="arithmetic", init=False)

    def __post_init__(self) -> None:
        rng = np.random.RandomState(self.seed)
        if 10**self.n_digits < self.n_eval * 2:
            raise ValueError("too few distinct prompts for a held-out evaluation set")
        eval_digits: set[tuple[int, ...]] = set()
        while len(eval_digits) < self.n_eval:
            eval_digits.add(tuple(rng.randint(10, size=self.n_digits).tolist()))
        self._eval = sorted(eval_digits)
        self._rows = []
        while len(self._rows) < self.n_samples:
            digits = tuple(rng.randint(10, size=self.n_digits).tolist())
            if digits not in eval_digits:
                self._rows.append(self._behaviour_row(digits, rng))

    @staticmethod
    def prompt(digits) -> str:
        return "+".join(str(d) for d in digits) + "="

    def _behaviour_row(self, digits: tuple[int, ...], rng: np.random.RandomState) -> dict:
        written, steps, step_rewards = 0, [], []
        for i, d in enumerate(digits):
            correct = (written + d) % 10
            value = correct if rng.rand() < self.p_correct else int(rng.choice([v for v in range(10) if v != correct]))
            step_rewards.append(float(value == correct))
            written = value
            steps.append(str(value) + (";" if i < len(digits) - 1 else ""))
        return {"prompt": self.prompt(digits), "steps": steps, "step_rewards": step_rewards,
                "reward": float(written == sum(digits) % 10)}

    # ---- data -------------------------------------------------------------------------------------
    def dataset(self) -> Dataset:
        """Rows `{prompt, steps, step_rewards, reward}` (format 2 of the data model)."""
        return Dataset.from_list(self._rows)

    def eval_dataset(self) -> Dataset:
        """Held-out behaviour rows: one behaviour-policy answer to each evaluation prompt (for the value
        diagnostics; no training row uses these prompts)."""
        rng = np.random.RandomState(self.seed + 2)
        return Dataset.from_list([self._behaviour_row(digits, rng) for digits in self._eval])

    def behavior_reward(self) -> float:
        """The behaviour data's success rate (exact final answers)."""
        return float(np.mean([row["reward"] for row in self._rows]))

    def preference_pairs(self) -> Dataset:
        """For every training prompt, a correct and an incorrect behaviour completion (drawn anew from the
        behaviour policy until both exist): rows `{prompt, chosen, rejected}` for DPO."""
        rng = np.random.RandomState(self.seed + 1)
        pairs = []
        for row in self._rows:
            digits = tuple(int(c) for c in row["prompt"].rstrip("=").split("+"))
            found: dict[float, str] = {row["reward"]: "".join(row["steps"])}
            while len(found) < 2:
                extra = self._behaviour_row(digits, rng)
                found.setdefault(extra["reward"], "".join(extra["steps"]))
            pairs.append({"prompt": row["prompt"], "chosen": found[1.0], "rejected": found[0.0]})
        return Dataset.from_list(pairs)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_char_tokenizer(list("0123456789+=;"))

    def model_config(self, tokenizer, n_layer: int = 4, n_embd: int = 128, n_head: int = 4) -> LlamaConfig:
        """A tiny Llama: rotary positions make "the digit 2n tokens back" a fixed offset, which a model with
        learned absolute positions (GPT-2) did not learn from a few thousand rows."""
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=4 * self.n_digits + 8,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )

    @property
    def max_new_tokens(self) -> int:
        return 2 * self.n_digits  # n digits, n - 1 semicolons, EOS

    step_stop_strings = (";",)

    # ---- evaluation -------------------------------------------------------------------------------
    def eval_prompts(self) -> list[str]:
        return [self.prompt(d) for d in self._eval]

    @staticmethod
    def answer(completion: str) -> str:
        """The final answer: the last step of the running sums."""
        return completion.strip().split(";")[-1]

    def process_rewards(self, prompts: list[str], completions: list[str]) -> list[dict[str, list]]:
        """Per completion the `steps` (split after each `;`, as the data writes them) and `step_rewards` (1 for a
        step that is the right running sum given the previous step written): process rows, like `dataset()`'s."""
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            digits = [int(c) for c in prompt.rstrip("=").split("+")]
            parts = completion.split(";")
            steps = [part + ";" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
            written, rewards = 0, []
            for step, d in zip(steps, digits + [None] * len(steps)):
                value = step.rstrip(";")
                rewards.append(float(d is not None and value == str((written + d) % 10)))
                written = int(value) if value.isdigit() and len(value) == 1 else written
            out.append({"steps": steps, "step_rewards": rewards})
        return out

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        """Per-sample `reward` = exact-answer accuracy (n steps, the last one the true sum) and
        `steps_correct` (fraction of well-formed steps correct given the previous ones)."""
        out: dict[str, list[float]] = {"reward": [], "steps_correct": []}
        for prompt, completion in zip(prompts, completions, strict=True):
            digits = [int(c) for c in prompt.rstrip("=").split("+")]
            steps = completion.strip().split(";")
            out["reward"].append(float(len(steps) == len(digits) and steps[-1] == str(sum(digits) % 10)))
            written, good = 0, 0
            for step, d in zip(steps, digits):
                good += step == str((written + d) % 10)
                written = int(step) if step.isdigit() and len(step) == 1 else written
            out["steps_correct"].append(good / len(digits))
        return out
