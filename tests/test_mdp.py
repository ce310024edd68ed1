"""Rows of the three input formats -> token-level tensors; malformed rows name the row and field."""

import pytest
import torch
from datasets import Dataset

from tokenq.mdp import TokenCollator, normalize_rewards, tokenize_dataset


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_outcome_row(tokenizer):
    ds = tokenize_dataset(Dataset.from_list([{"prompt": "ab", "completion": "cd", "reward": 0.5}]), tokenizer)
    row = ds[0]
    assert row["input_ids"] == _ids(tokenizer, "abcd") + [tokenizer.eos_token_id]
    # states t=1,2,3 emit c, d, <eos>; the reward sits on the last action (the EOS)
    assert row["action_mask"] == [0, 1, 1, 1, 0]
    assert row["rewards"] == [0, 0, 0, 0.5, 0]
    assert row["terminated"] is True


def test_truncated_row_has_no_eos(tokenizer):
    row = tokenize_dataset(Dataset.from_list([{"prompt": "ab", "completion": "cd", "reward": 1.0, "truncated": True}]), tokenizer)[0]
    assert row["input_ids"] == _ids(tokenizer, "abcd")
    assert row["action_mask"] == [0, 1, 1, 0] and row["rewards"] == [0, 0, 1.0, 0]
    assert row["terminated"] is False


def test_long_row_is_cut_and_marked_truncated(tokenizer):
    row = tokenize_dataset(Dataset.from_list([{"prompt": "ab", "completion": "cdefg", "reward": 1.0}]), tokenizer, max_length=4)[0]
    assert row["input_ids"] == _ids(tokenizer, "abcd")
    assert row["terminated"] is False and row["action_mask"] == [0, 1, 1, 0]


def test_process_row(tokenizer):
    rows = [{"prompt": "1+2=", "steps": ["3;", "5;"], "step_rewards": [1.0, 0.0], "reward": 2.0}]
    row = tokenize_dataset(Dataset.from_list(rows), tokenizer)[0]
    assert row["input_ids"] == _ids(tokenizer, "1+2=3;5;") + [tokenizer.eos_token_id]
    # actions: x[4..8] = 3 ; 5 ; <eos>, taken at t = 3..7; step 1 ends at x[5] (t=4), step 2 at x[7] (t=6)
    assert row["action_mask"] == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    assert row["rewards"] == [0, 0, 0, 0, 1.0, 0, 0.0, 2.0, 0]


def test_chat_row_only_assistant_tokens_act(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo", "reward": 0.25},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "no", "reward": 1.0},
    ]
    row = tokenize_dataset(Dataset.from_list([{"messages": messages}]), tokenizer)[0]
    rendered = "<|user|>hi<|end|><|assistant|>yo<|end|><|user|>ok<|end|><|assistant|>no<|end|>"
    assert row["input_ids"] == _ids(tokenizer, rendered)
    # tokens: 0 <|user|> 1 h 2 i 3 <|end|> 4 <|assistant|> 5 y 6 o 7 <|end|> 8 <|user|> 9 o 10 k 11 <|end|>
    #         12 <|assistant|> 13 n 14 o 15 <|end|>; assistant tokens 5-7 and 13-15 are actions at t-1
    expected = [0] * 16
    for t in (4, 5, 6, 12, 13, 14):
        expected[t] = 1
    assert row["action_mask"] == expected
    assert row["rewards"][6] == 0.25 and row["rewards"][14] == 1.0 and sum(row["rewards"]) == 1.25


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "a", "completion": "b", "reward": 1.0}, {"prompt": "a", "completion": "b", "reward": None}],
         r"row 1: field 'reward' must be a finite number"),
        ([{"prompt": "a", "completion": "b", "reward": float("nan")}], r"row 0: field 'reward'"),
        ([{"prompt": "a", "steps": ["b", "c"], "step_rewards": [1.0, 0.0]}, {"prompt": "a", "steps": ["b", "c"], "step_rewards": [1.0]}],
         r"row 1: field 'step_rewards' must be a list with one number per step"),
        ([{"prompt": "a", "steps": ["b", ""], "step_rewards": [1.0, 0.0]}], r"row 0: field 'steps'"),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
          {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}],
         r"row 1: field 'messages\[0\]' needs a role"),
        ([{"messages": [{"role": "user", "content": "a", "reward": 1.0}, {"role": "assistant", "content": "b", "reward": None}]}],
         r"row 0: field 'messages\[0\].reward' is set on a user message"),
        ([{"prompt": "a", "completion": "b", "reward": 1.0, "score": 2.0}], r"field 'score' is not part of the 'outcome' format"),
        ([{"prompt": "a", "completion": "b"}], r"missing field\(s\) \['reward'\]"),
        ([{"prompt": "a", "completion": "b", "reward": 1.0, "truncated": None}, {"prompt": "a", "completion": "", "reward": 1.0, "truncated": True}],
         r"row 1: no action tokens"),
    ],
)
def test_malformed_rows_name_row_and_field(tokenizer, rows, match):
    with pytest.raises(ValueError, match=match):
        tokenize_dataset(Dataset.from_list(rows), tokenizer)


def test_collator_pads_right(tokenizer):
    ds = tokenize_dataset(Dataset.from_list([
        {"prompt": "a", "completion": "bc", "reward": 1.0, "truncated": False},
        {"prompt": "a", "completion": "b", "reward": 0.0, "truncated": True},
    ]), tokenizer)
    batch = TokenCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["action_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["input_ids"][1, 2:].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["terminated"].tolist() == [True, False]
    assert batch["rewards"].dtype == torch.float32


def test_reward_normalisation_is_opt_in(tokenizer):
    ds = tokenize_dataset(Dataset.from_list([{"prompt": "a", "completion": "b", "reward": r} for r in (0.0, 1.0, 2.0)]), tokenizer)
    same, stats = normalize_rewards(ds, "none")
    assert same is ds and stats == {"shift": 0.0, "scale": 1.0}
    z, stats = normalize_rewards(ds, "zscore")
    # returns 0, 1, 2: mean 1, sample std 1 -> -1, 0, 1
    assert [sum(r) for r in z["rewards"]] == pytest.approx([-1.0, 0.0, 1.0])
    scaled, _ = normalize_rewards(ds, "scale")
    assert [sum(r) for r in scaled["rewards"]] == pytest.approx([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="reward_normalization"):
        normalize_rewards(ds, "minmax")


# ---- trl's formats -------------------------------------------------------------------------------
def _tok(tokenizer, *tokens):
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_conversational_prompt_completion_row(tokenizer):
    """Only the completion's assistant tokens act; the assistant turn inside the prompt is context."""
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "ok"}],
           "completion": [{"role": "assistant", "content": "ab"}], "reward": 0.5}
    out = tokenize_dataset(Dataset.from_list([row]), tokenizer)[0]
    U, A, E = "<|user|>", "<|assistant|>", "<|end|>"
    expected = _tok(tokenizer, U, "h", "i", E, A, "y", "o", E, U, "o", "k", E, A, "a", "b", E)
    assert out["input_ids"] == expected
    # actions: a, b, <|end|> of the completion (positions 13, 14, 15) -> states 12, 13, 14
    assert out["action_mask"] == [0] * 12 + [1, 1, 1, 0]
    assert out["rewards"] == [0.0] * 14 + [0.5, 0.0] and out["terminated"] is True


def test_stepwise_supervision_row(tokenizer):
    """trl PRM data: a True / False label is a 1.0 / 0.0 process reward on the step's separator token."""
    row = {"prompt": "1+2=", "completions": ["3", "5"], "labels": [True, False]}
    out = tokenize_dataset(Dataset.from_list([row]), tokenizer)[0]
    sep = _ids(tokenizer, "\n")
    assert out["input_ids"] == _ids(tokenizer, "1+2=3") + sep + _ids(tokenizer, "5") + sep + [tokenizer.eos_token_id]
    # prompt 1+2= is positions 0-3; actions 3, sep, 5, sep, eos at 4-8 -> states 3-7
    assert out["action_mask"] == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    assert out["rewards"] == [0, 0, 0, 0, 1.0, 0, 0.0, 0, 0]
    numeric = tokenize_dataset(Dataset.from_list([{**row, "labels": [0.25, -1.0]}]), tokenizer)[0]
    assert numeric["rewards"] == [0, 0, 0, 0, 0.25, 0, -1.0, 0, 0]


@pytest.mark.parametrize("label, reward", [(True, 1.0), (False, 0.0)])
def test_unpaired_preference_row(tokenizer, label, reward):
    out = tokenize_dataset(Dataset.from_list([{"prompt": "ab", "completion": "cd", "label": label}]), tokenizer)[0]
    assert out["input_ids"] == _ids(tokenizer, "abcd") + [tokenizer.eos_token_id]
    assert out["action_mask"] == [0, 1, 1, 1, 0] and out["rewards"] == [0, 0, 0, reward, 0]
    chat = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}], "label": label}
    conv = tokenize_dataset(Dataset.from_list([chat]), tokenizer)[0]
    assert conv["action_mask"] == [0, 0, 0, 1, 1, 0] and conv["rewards"] == [0, 0, 0, 0, reward, 0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "completions": ["b", "c"], "labels": [True]}, r"row 0: field 'labels' must be a list with one label per step \(2 steps\)"),
    ({"prompt": "a", "completions": ["b"], "labels": ["yes"]}, r"row 0: field 'labels\[0\]' must be a finite number"),
    ({"prompt": "a", "completions": [], "labels": []}, r"row 0: field 'completions' must be a non-empty list"),
    ({"prompt": "a", "completion": "b", "label": "good"}, r"row 0: field 'label' must be a boolean"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "b", "reward": 1.0},
     r"row 0: field 'completion' must be a non-empty list of messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "b"}], "reward": 1.0},
     r"row 0: field 'completion' has no assistant message"),
    ({"prompt": [{"role": "robot", "content": "q"}], "completion": [{"role": "assistant", "content": "b"}], "reward": 1.0},
     r"row 0: field 'prompt\[0\]' needs a role"),
])
def test_bad_rows_of_trl_formats(tokenizer, row, message):
    with pytest.raises(ValueError, match=message):
        tokenize_dataset(Dataset.from_list([row]), tokenizer)
