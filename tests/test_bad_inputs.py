"""Every bad input gets a clear error, through the path a user takes (a recipe's `main(argv)` or the public
API), before any work starts; a pre-existing output folder is byte-identical afterwards."""

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.conftest import tiny_gpt2
from tests.test_recipes import _recipe
from tokenq import IQLConfig, IQLTrainer, TokenQConfig, TokenQModel, generate, tokenize_dataset
from tokenq.generation import STRATEGIES

GOOD = {"prompt": "ab", "completion": "cd", "reward": 1.0}


def _jsonl(path: Path, rows: list[dict] | None) -> str:
    path.write_text("" if rows is None else "\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# id: (rows of the dataset file, or None for an empty file; extra argv; exception; message)
RECIPE_CASES = {
    "empty file": (None, [], ValueError, r"dataset .*data.jsonl has no rows"),
    "missing file": ("missing", [], FileNotFoundError, r"--dataset_name .*missing.jsonl: no such file"),
    "abbreviated flag": ([GOOD], ["--learning_rat", "0.1"], ValueError, r"--learning_rat"),
    "abbreviated list flag": ([GOOD], ["--eval_beta", "3"], ValueError, r"--eval_beta"),
    "prompt longer than max_length": ([{**GOOD, "prompt": "ab" * 40}], ["--max_length", "16"], ValueError,
                                      r"row 0: the prompt \(80 tokens before the first action\) is longer than max_length=16"),
    "no row has an action": ([{**GOOD, "prompt": "a" * 30}] * 3, ["--max_length", "8"], ValueError, r"row 0: the prompt"),
    "chat without assistant turn": ([{"messages": [{"role": "user", "content": "hi"}]}], [], ValueError,
                                    r"row 0: no action tokens: .*only assistant turns are actions"),
    "eval knob out of range": ([GOOD], ["--eval_top_p", "1.5"], ValueError, r"--eval_top_p: top_p must be in \(0, 1\]"),
    "eval grid value out of range": ([GOOD], ["--eval_num_beams", "4", "0"], ValueError,
                                     r"--eval_num_beams: num_beams must be an integer >= 1, got 0"),
    # already good, kept good
    "reward None": ([GOOD, {**GOOD, "reward": None}], [], ValueError, r"row 1: field 'reward'"),
    "reward NaN": ([GOOD, {**GOOD, "reward": float("nan")}], [], ValueError, r"row 1: field 'reward'"),
    "unknown field": ([{**GOOD, "score": 1}], [], ValueError, r"score"),
    "missing field": ([{"prompt": "a", "reward": 1.0}], [], ValueError, r"completion"),
    "step_rewards length": ([{"prompt": "a", "steps": ["b", "c"], "step_rewards": [1.0]}], [], ValueError, r"row 0: .*step_rewards"),
    "bad chat role": ([{"messages": [{"role": "robot", "content": "x"}]}], [], ValueError, r"row 0: field 'messages\[0\]'"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path, gpt2, tokenizer):
    """An output folder an earlier run left: checkpoint, card, metrics, plot."""
    out = tmp_path / "out"
    TokenQModel(gpt2, TokenQConfig()).save_pretrained(out, tokenizer=tokenizer)
    (out / "metrics.json").write_text('{"best_reward": 0.9}')
    (out / "reward_vs_beta.png").write_bytes(b"\x89PNG earlier plot")
    return out, _snapshot(out)


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_rejects_bad_input_before_any_work(case, tmp_path, llama_dir, earlier_run):
    rows, extra, error, message = RECIPE_CASES[case]
    out, before = earlier_run
    data = str(tmp_path / "missing.jsonl") if rows == "missing" else _jsonl(tmp_path / "data.jsonl", rows)
    argv = ["--model_name_or_path", llama_dir, "--dataset_name", data, "--output_dir", str(out), "--max_steps", "2",
            "--use_cpu", "true", "--disable_tqdm", "true", "--per_device_train_batch_size", "2", *extra]
    with pytest.raises(error, match=message):
        _recipe("iql_lm").main(argv)
    assert _snapshot(out) == before


ROW = '{"prompt": "ab", "completion": "cd", "reward": 1.0}'
# id: (file name, its text, the message: the file and the line where it stops being well-formed)
MALFORMED = {
    "jsonl cut": ("rows.jsonl", f"{ROW}\n{ROW}\n{ROW[:20]}", r"rows.jsonl: line 3, column 18: not valid JSON \(Unterminated string"),
    "jsonl line 2": ("rows.jsonl", f"{ROW}\n{ROW.replace(',', '', 1)}\n{ROW}\n", r"rows.jsonl: line 2, column \d+: not valid JSON"),
    "jsonl not an object": ("rows.jsonl", f"{ROW}\n[1, 2]\n", r"rows.jsonl: line 2: a JSON object \(one row\) per line"),
    "json document": ("rows.json", f"[\n{ROW},\n{ROW.replace(',', '', 1)}\n]", r"rows.json: line 3, column \d+: not valid JSON"),
    "json lines in .json": ("rows.json", f"{ROW}\n{ROW[:-1]}\n", r"rows.json: line 2, column \d+: not valid JSON"),
    "csv extra field": ("rows.csv", "prompt,completion,reward\nab,cd,1\nab,cd,1,7\n", r"rows.csv: line 3: 4 fields, the header has 3"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("flag", ["--dataset_name", "--eval_dataset"])
def test_a_malformed_data_file_is_located_by_line(case, flag, tmp_path, llama_dir, earlier_run):
    name, text, message = MALFORMED[case]
    (tmp_path / name).write_text(text)
    good = _jsonl(tmp_path / "good.jsonl", [GOOD, {**GOOD, "prompt": "ba"}])
    data = {"--dataset_name": good, "--eval_dataset": good, flag: str(tmp_path / name)}
    out, before = earlier_run
    argv = ["--model_name_or_path", llama_dir, *[x for kv in data.items() for x in kv], "--output_dir", str(out),
            "--max_steps", "2", "--use_cpu", "true"]
    with pytest.raises(ValueError, match=rf"{flag} .*{message}"):
        _recipe("iql_lm").main(argv)
    assert _snapshot(out) == before


API_CASES = {
    "beta nan": ({"beta": float("nan")}, r"beta must be a finite number >= 0"),
    "beta inf": ({"beta": float("inf")}, r"beta must be a finite number >= 0"),
    "beta negative": ({"beta": -1.0}, r"beta must be a finite number >= 0"),
    "max_new_tokens 0": ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
    "empty prompt": ({"empty_row": 1}, r"prompt 1 is empty"),
    "zero-length prompts": ({"zero_length": True}, r"prompt 0 is empty"),
    "right-padded prompt": ({"right_padded": 1}, r"prompt\(s\) \[1\] are right-padded .*padding_side='left'"),
    "prompt beyond the positions": ({"prompt_length": 70}, r"prompt 0 has 70 tokens: no room for new tokens in the backbone's 64 positions"),
    "prompt + new tokens beyond": ({"prompt_length": 62}, r"prompt 0 has 62 tokens, plus max_new_tokens=3 makes 65 positions, more than "
                                                         r"the backbone's 64: lower max_new_tokens to <= 2"),
    "num_candidates 0": ({"num_candidates": 0}, r"num_candidates must be an integer >= 1, got 0"),
    "num_continuations 0": ({"num_continuations": 0}, r"num_continuations must be an integer >= 1, got 0"),
    "num_beams 0": ({"num_beams": 0}, r"num_beams must be an integer >= 1, got 0"),
    "step_tokens 0": ({"step_tokens": 0}, r"step_tokens must be an integer >= 1 \(or None, with step_stop_strings\), got 0"),
    "step_beam 0": ({"step_beam": 0}, r"step_beam must be an integer >= 1, got 0"),
    "top_p 1.5": ({"top_p": 1.5}, r"top_p must be in \(0, 1\] .*got 1.5"),
    "top_p 0": ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    "top_k -1": ({"top_k": -1}, r"top_k must be an integer >= 0"),
    "temperature 0": ({"temperature": 0.0}, r"temperature must be a finite number > 0 \(greedy decoding: strategy 'greedy'\)"),
    "temperature nan": ({"temperature": float("nan")}, r"temperature must be a finite number > 0"),
    "resample_temperature 0": ({"resample_temperature": 0.0}, r"resample_temperature must be a finite number > 0"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(API_CASES))
def test_generate_rejects_bad_arguments_for_every_strategy(case, strategy, tokenizer, earlier_run):
    kwargs, message = dict(API_CASES[case][0]), API_CASES[case][1]
    out, before = earlier_run
    model = TokenQModel.from_pretrained(str(out))
    ids, mask = torch.tensor([[5, 6, 7], [5, 6, 7]]), torch.ones(2, 3, dtype=torch.long)
    if kwargs.pop("empty_row", None) is not None:
        mask[1] = 0
    if kwargs.pop("zero_length", False):
        ids, mask = ids[:, :0], mask[:, :0]
    if (row := kwargs.pop("right_padded", None)) is not None:
        mask[row, -1] = 0
    if length := kwargs.pop("prompt_length", None):
        ids, mask = torch.full((2, length), 5), torch.ones(2, length, dtype=torch.long)
    kwargs = {"beta": 1.0, "max_new_tokens": 3, **kwargs}
    extra = {"num_beams": 2} if strategy == "beam" else {"step_tokens": 1} if strategy == "step_search" else {}
    extra = {k: v for k, v in extra.items() if k not in kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, ids, mask, strategy=strategy, pad_token_id=0, eos_token_id=1, **kwargs, **extra)
    assert _snapshot(out) == before


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "best_of_n", "--num_candidates", "0"], r"num_candidates must be an integer >= 1, got 0"),
    (["--strategy", "step_search", "--num_continuations", "0"], r"num_continuations must be an integer >= 1, got 0"),
    (["--strategy", "beam", "--num_beams", "0"], r"num_beams must be an integer >= 1, got 0"),
    (["--top_p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--strategy", "step_search", "--step_tokens", "0"], r"step_tokens must be an integer >= 1"),
    (["--temperature", "0"], r"temperature must be a finite number > 0 \(greedy decoding: strategy 'greedy'\)"),
])
def test_tokenq_generate_checks_its_arguments_before_loading_anything(argv, message):
    from tokenq.cli import run

    with pytest.raises(ValueError, match=message):  # the checkpoint does not exist: the arguments are checked first
        run(["generate", "./no/such/checkpoint", "--prompt", "ab", *argv])


@pytest.mark.parametrize("name", ["does/not/exist", "./no/such/folder", "someone/not-cached"])
def test_loading_what_is_not_there(name):
    with pytest.raises(FileNotFoundError, match=f"no tokenq checkpoint at {name}: not a folder"):
        TokenQModel.from_pretrained(name)


def test_rows_cut_at_max_length_are_counted_once(tokenizer, caplog):
    rows = [{"prompt": "ab", "completion": "c" * 30, "reward": 1.0}] * 3 + [GOOD]
    with caplog.at_level(logging.WARNING, logger="tokenq"):
        data = tokenize_dataset(Dataset.from_list(rows), tokenizer, max_length=10)
    assert caplog.text.count("rows cut at max_length") == 1
    assert "3 of 4 rows cut at max_length=10; their rewards after the cut are lost; they are marked truncated" in caplog.text
    assert data["terminated"] == [False, False, False, True] and all(sum(r) == 0 for r in data["rewards"][:3])


@pytest.mark.parametrize("reward", [1e6, 1e-6])
def test_reward_scale_far_from_one_is_reported(tokenizer, tmp_path, caplog, reward):
    rows = [{**GOOD, "reward": reward * (i % 2)} for i in range(4)]
    args = IQLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, reward_normalization="none")
    with caplog.at_level(logging.WARNING, logger="tokenq"):
        IQLTrainer(TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()), args, Dataset.from_list(rows), tokenizer)
    assert f"episode returns are on a scale of {reward:.3g}" in caplog.text and "--reward_normalization zscore" in caplog.text


def test_bf16_on_a_machine_without_gpu_trains_on_cpu(tokenizer, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = IQLConfig(output_dir=str(tmp_path), report_to="none", bf16=True, max_steps=1, per_device_train_batch_size=2)
    assert args.use_cpu and args.bf16
    trainer = IQLTrainer(TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()), args, Dataset.from_list([GOOD] * 2), tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
