"""The token-level MDP: dataset rows -> token sequences with action masks and rewards, and the collator.

Indexing: position `t` of `input_ids` is the state `s_t` (the prefix `x[0..t]`); the action
taken there is `a_t = x[t+1]`. `action_mask[t] = 1` iff `x[t+1]` was emitted by the agent, and
`rewards[t]` is the reward received after `a_t`. Row formats (detected from the columns):

1. `prompt`, `completion`, `reward`: one outcome reward on the last action (the EOS). `prompt` and
   `completion` may also be message lists (trl's conversational prompt-completion): rendered with the
   chat template, the completion's assistant tokens are the actions, the reward sits on the last one.
2. `prompt`, `steps`, `step_rewards` [, `reward`]: each step reward on the last token of its step; the
   optional outcome reward on the final EOS.
3. `messages` (roles system/user/assistant/tool, optional per-message `reward`): rendered with the
   tokenizer's chat template; only assistant tokens are actions; a turn's reward sits on its last token.
4. `prompt`, `completions`, `labels` (trl's stepwise supervision, PRM data): process rewards, 1.0 / 0.0
   for a True / False label (a number is taken as the reward), each step followed by `STEP_SEPARATOR`.
5. `prompt`, `completion`, `label` (trl's unpaired preference, KTO data): outcome reward 1.0 / 0.0 for a
   True / False label; string or conversational prompt and completion.

Every format takes the provenance columns of collected rows (`round`, `policy`, `strategy`), which are
not read, and an optional boolean `truncated` column: a truncated episode was cut, not ended, so
its last action bootstraps from the final state instead of V = 0, and no EOS is appended. Sequences
longer than `max_length` are cut and marked truncated. Any other column, or a malformed value, raises
`ValueError` naming the row and the field, before any training step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

logger = logging.getLogger(__name__)

FORMATS = {
    "outcome": ({"prompt", "completion", "reward"}, {"truncated"}),
    "process": ({"prompt", "steps", "step_rewards"}, {"reward", "truncated"}),
    "chat": ({"messages"}, {"truncated"}),
    "stepwise": ({"prompt", "completions", "labels"}, {"truncated"}),  # trl's stepwise supervision (PRM data)
    "preference": ({"prompt", "completion", "label"}, {"truncated"}),  # trl's unpaired preference (KTO data)
}
PROVENANCE_COLUMNS = ("round", "policy", "strategy")  # written by `tokenq collect`, allowed in every format, not read
STEP_SEPARATOR = "\n"  # after every step of stepwise-supervision rows, as trl's PRMTrainer (step_separator)
TOKEN_COLUMNS = ["input_ids", "action_mask", "rewards", "terminated"]


def detect_format(columns: list[str]) -> str:
    """The input format of a dataset from its column names; unknown columns raise, naming the field."""
    cols = set(columns)
    name = ("chat" if "messages" in cols else "process" if "steps" in cols else "stepwise" if "completions" in cols
            else "preference" if "label" in cols else "outcome")
    required, optional = FORMATS[name]
    if missing := sorted(required - cols):
        raise ValueError(f"dataset is missing field(s) {missing} of the {name!r} format (row 0)")
    if extra := sorted(cols - required - optional - set(PROVENANCE_COLUMNS)):
        raise ValueError(
            f"row 0: field {extra[0]!r} is not part of the {name!r} format "
            f"(allowed: {sorted(required | optional)}); drop it with dataset.remove_columns"
        )
    return name


def _check_str(row: dict, idx: int, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"row {idx}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_float(value: Any, idx: int, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"row {idx}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


class _Builder:
    """Accumulates one row's tokens; `act` marks appended tokens as actions."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.is_action: list[bool] = []  # per token: was it emitted by the agent?
        self.token_rewards: list[float] = []  # per token: reward received after emitting it

    def add(self, ids: list[int], act: bool, reward: float = 0.0) -> None:
        self.ids += ids
        self.is_action += [act] * len(ids)
        self.token_rewards += [0.0] * len(ids)
        if ids:
            self.token_rewards[-1] += reward


def _row_outcome(row: dict, idx: int, tokenizer, builder: _Builder, truncated: bool, reward: float | None = None) -> None:
    """`prompt`, `completion`, `reward`: both strings, or both message lists (trl's conversational
    prompt-completion: rendered with the chat template; the completion's assistant tokens are the actions)."""
    reward = _check_float(row["reward"], idx, "reward") if reward is None else reward
    if isinstance(row["prompt"], list) or isinstance(row["completion"], list):
        for key in ("prompt", "completion"):
            if not isinstance(row[key], list) or not row[key]:
                raise ValueError(f"row {idx}: field {key!r} must be a non-empty list of messages (conversational "
                                 "prompt-completion), as the other field is")
        _chat_tokens(row["prompt"] + row["completion"], idx, tokenizer, builder, acting_from=len(row["prompt"]),
                     names=lambda j, n=len(row["prompt"]): f"prompt[{j}]" if j < n else f"completion[{j - n}]")
        if not any(builder.is_action):
            raise ValueError(f"row {idx}: field 'completion' has no assistant message (only assistant tokens are actions)")
        last = max(t for t, a in enumerate(builder.is_action) if a)
        builder.token_rewards[last] += reward
        return
    builder.add(tokenizer(_check_str(row, idx, "prompt")).input_ids, act=False)
    completion = tokenizer(_check_str(row, idx, "completion"), add_special_tokens=False).input_ids
    eos = [] if truncated else [tokenizer.eos_token_id]
    builder.add(completion + eos, act=True, reward=reward)


def _row_preference(row: dict, idx: int, tokenizer, builder: _Builder, truncated: bool) -> None:
    """Unpaired preference (`label`: True = desirable): an outcome reward of 1.0 for True, 0.0 for False."""
    if not isinstance(row["label"], bool):
        raise ValueError(f"row {idx}: field 'label' must be a boolean, got {row['label']!r}")
    _row_outcome(row, idx, tokenizer, builder, truncated, reward=float(row["label"]))


def _row_stepwise(row: dict, idx: int, tokenizer, builder: _Builder, truncated: bool) -> None:
    """Stepwise supervision (`completions`: the steps, `labels`: one per step) as process rewards: a boolean
    label gives 1.0 (True) or 0.0 (False), a number is the reward itself; each step is followed by
    `STEP_SEPARATOR` and its reward sits on the step's last token (the separator)."""
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"row {idx}: field 'completions' must be a non-empty list of non-empty strings (the steps)")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise ValueError(f"row {idx}: field 'labels' must be a list with one label per step ({len(steps)} steps)")
    rewards = [float(x) if isinstance(x, bool) else _check_float(x, idx, f"labels[{j}]") for j, x in enumerate(labels)]
    _row_process({"prompt": row["prompt"], "steps": [s + STEP_SEPARATOR for s in steps], "step_rewards": rewards},
                 idx, tokenizer, builder, truncated)


def _row_process(row: dict, idx: int, tokenizer, builder: _Builder, truncated: bool) -> None:
    steps, step_rewards = row["steps"], row["step_rewards"]
    if not isinstance(steps, list) or not all(isinstance(s, str) and s for s in steps):  # [] = the EOS alone
        raise ValueError(f"row {idx}: field 'steps' must be a list of non-empty strings")
    if not isinstance(step_rewards, list) or len(step_rewards) != len(steps):
        raise ValueError(
            f"row {idx}: field 'step_rewards' must be a list with one number per step ({len(steps)} steps)"
        )
    builder.add(tokenizer(_check_str(row, idx, "prompt")).input_ids, act=False)
    for j, (step, r) in enumerate(zip(steps, step_rewards)):
        ids = tokenizer(step, add_special_tokens=False).input_ids
        builder.add(ids, act=True, reward=_check_float(r, idx, f"step_rewards[{j}]"))
    outcome = row.get("reward")
    outcome = 0.0 if outcome is None else _check_float(outcome, idx, "reward")
    if truncated:
        builder.token_rewards[-1] += outcome
    else:
        builder.add([tokenizer.eos_token_id], act=True, reward=outcome)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
    )


def _row_chat(row: dict, idx: int, tokenizer, builder: _Builder, truncated: bool) -> None:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {idx}: field 'messages' must be a non-empty list of messages")
    _chat_tokens(messages, idx, tokenizer, builder, acting_from=0, names=lambda j: f"messages[{j}]")


def _chat_tokens(messages: list, idx: int, tokenizer, builder: _Builder, acting_from: int, names) -> None:
    """Render `messages` with the chat template; assistant messages from index `acting_from` on are actions
    (earlier ones are context), per-message `reward`s sit on their last token. `names(j)` names message j."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; conversational rows (message lists) need one")
    clean = []
    for j, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in {"system", "user", "assistant", "tool"} or not isinstance(content, str):
            raise ValueError(f"row {idx}: field '{names(j)}' needs a role (system/user/assistant/tool) and string content")
        clean.append({"role": role, "content": content})
    # The chat template is rendered prefix by prefix: the tokens a message adds are the difference between
    # consecutive renderings (templates know nothing of actions, so nothing in transformers does this).
    for j, m in enumerate(messages):
        reward = m.get("reward")
        reward = 0.0 if reward is None else _check_float(reward, idx, f"{names(j)}.reward")
        acting = clean[j]["role"] == "assistant" and j >= acting_from
        if reward and not acting:
            what = f"a {clean[j]['role']} message" if clean[j]["role"] != "assistant" else "context, not an action"
            raise ValueError(f"row {idx}: field '{names(j)}.reward' is set on {what}")
        full = _render(tokenizer, clean[: j + 1], generation_prompt=False)
        start = _render(tokenizer, clean[:j], True) if clean[j]["role"] == "assistant" else full[: len(builder.ids)]
        if full[: len(start)] != start or start[: len(builder.ids)] != builder.ids:
            raise ValueError(f"row {idx}: field '{names(j)}': the chat template does not render prefix by prefix")
        builder.add(start[len(builder.ids):], act=False)
        builder.add(full[len(start):], act=acting, reward=reward)


_ROW_FNS = {"outcome": _row_outcome, "process": _row_process, "chat": _row_chat, "stepwise": _row_stepwise,
            "preference": _row_preference}


def tokenize_row(row: dict, idx: int, tokenizer, fmt: str, max_length: int) -> dict[str, Any]:
    """One dataset row -> `input_ids`, `action_mask`, `rewards` (lists, length T) and `terminated`."""
    truncated = row.get("truncated")
    if truncated is not None and not isinstance(truncated, bool):
        raise ValueError(f"row {idx}: field 'truncated' must be a boolean, got {truncated!r}")
    truncated = bool(truncated)
    builder = _Builder()
    _ROW_FNS[fmt](row, idx, tokenizer, builder, truncated)
    ids, is_action, token_rewards = builder.ids, builder.is_action, builder.token_rewards
    if not any(is_action):
        raise ValueError(f"row {idx}: no action tokens: nothing in the row is the agent's (in chat rows only assistant "
                         "turns are actions)")
    if is_action[0]:
        raise ValueError(f"row {idx}: the first token is an action; a prompt (or BOS) must come first")
    cut = len(ids) > max_length
    if cut:
        if not any(is_action[1:max_length]):
            raise ValueError(f"row {idx}: the prompt ({is_action.index(True)} tokens before the first action) is longer "
                             f"than max_length={max_length}: no action fits; raise --max_length or shorten the prompt")
        ids, is_action, token_rewards, truncated = ids[:max_length], is_action[:max_length], token_rewards[:max_length], True
    # shift to the state convention: action_mask[t] / rewards[t] describe a_t = x[t+1]
    action_mask = [int(a) for a in is_action[1:]] + [0]
    rewards = token_rewards[1:] + [0.0]
    return {"input_ids": ids, "action_mask": action_mask, "rewards": rewards, "terminated": not truncated, "cut": cut}


def tokenize_dataset(dataset: Dataset, tokenizer, max_length: int = 1024, num_proc: int | None = None,
                     warn_cut: bool = True) -> Dataset:
    """Map a dataset of any of the formats to token-level columns (`TOKEN_COLUMNS`); a malformed row raises a
    `ValueError` naming the row and the field; rows cut at `max_length` are counted in a warning (`warn_cut`)."""
    fmt = detect_format(dataset.column_names)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (it ends every completion)")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    tokenized = dataset.map(
        tokenize_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "max_length": max_length},
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="tokenizing (token-level MDP)",
    )
    cut = sum(tokenized["cut"])
    if cut and warn_cut:
        logger.warning("%d of %d rows cut at max_length=%d; their rewards after the cut are lost; they are marked "
                       "truncated (their last action bootstraps from V instead of ending the episode)",
                       cut, len(tokenized), max_length)
    return tokenized.remove_columns("cut")


def check_reward_scale(dataset: Dataset, low: float = 1e-3, high: float = 1e3) -> dict[str, float]:
    """Statistics of the episode returns of a tokenized dataset; warns when their scale is far from 1 (the
    heads start near 0 and learn at rates set for O(1) values: returns of 1e6 give huge TD losses and
    gradients, returns of 1e-6 vanish in them), suggesting `--reward_normalization`."""
    returns = torch.tensor([sum(r) for r in dataset["rewards"]], dtype=torch.float64)
    stats = {"mean": returns.mean().item(), "std": returns.std().item() if len(returns) > 1 else 0.0,
             "min": returns.min().item(), "max": returns.max().item()}
    scale = returns.abs().max().item()
    if scale > high or 0 < scale < low:
        logger.warning("episode returns are on a scale of %.3g (mean %.3g, std %.3g, min %.3g, max %.3g): value heads train "
                       "poorly far from O(1); consider --reward_normalization zscore (or scale)", scale, *stats.values())
    return stats


def normalize_rewards(dataset: Dataset, mode: str, stats: dict[str, float] | None = None) -> tuple[Dataset, dict[str, float]]:
    """Opt-in reward normalisation on a tokenized dataset, from the statistics of episode returns.

    `none`: unchanged. `scale`: every reward divided by std(returns). `zscore`: additionally
    `-mean/std` is added to each episode's last action, so undiscounted returns become z-scores
    (trlx z-scores its one outcome reward per sample, which is this for outcome-only data).
    `stats` (`{"scale", "shift"}`, as returned for the training data) applies the training data's normalisation
    to other rows (held-out rows must be in the heads' units, not z-scored by their own statistics).
    """
    if mode == "none":
        return dataset, {"shift": 0.0, "scale": 1.0}
    if mode not in {"scale", "zscore"}:
        raise ValueError(f"reward_normalization must be none/scale/zscore, got {mode!r}")
    if stats is None:
        returns = torch.tensor([sum(r) for r in dataset["rewards"]], dtype=torch.float64)
        std = returns.std().item() if len(returns) > 1 else 1.0
        scale = 1.0 / std if std > 0 else 1.0
        shift = -returns.mean().item() * scale if mode == "zscore" else 0.0
    else:
        scale, shift = stats["scale"], stats["shift"]
    logger.info("rewards normalised (%s): the heads learn scale * return + shift, scale %.4g, shift %.4g", mode, scale, shift)

    def apply(row: dict) -> dict:
        rewards = [r * scale for r in row["rewards"]]
        last = max(t for t, a in enumerate(row["action_mask"]) if a)
        rewards[last] += shift
        return {"rewards": rewards}

    return dataset.map(apply, desc="normalizing rewards"), {"shift": shift, "scale": scale}


def action_positions(action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where actions are taken. The last column never holds one (it has no next token);
    tensors gathered with this mask are (N,) in row-major order, the order every per-action tensor uses."""
    acting = action_mask.bool()
    return torch.cat([acting[:, :-1], torch.zeros_like(acting[:, -1:])], dim=1)


@dataclass
class TokenCollator:
    """Right-pads tokenized rows into a `TokenBatch` dict of tensors.

    Keys: `input_ids`, `attention_mask`, `action_mask` (B, T) long; `rewards` (B, T) float;
    `terminated` (B,) bool.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value, dtype) -> torch.Tensor:
            return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=dtype)

        return {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.long
            ),
            "action_mask": pad("action_mask", 0, torch.long),
            "rewards": pad("rewards", 0.0, torch.float32),
            "terminated": torch.tensor([bool(r["terminated"]) for r in rows], dtype=torch.bool),
        }
