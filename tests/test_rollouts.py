"""`tokenq collect`: rows that every recipe reads back, scored by the task (process rewards where it gives them), and
the same rows from 2 data-parallel processes (gloo) as from one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenq.cli import run
from tokenq.data import load_rows
from tokenq.mdp import PROVENANCE_COLUMNS, tokenize_dataset
from tokenq.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


COLLECT = ["--task", "arithmetic", "--max_prompts", "12", "--num_samples", "2", "--batch_size", "5", "--seed", "3"]


def test_collected_rows_round_trip_through_tokenize_dataset(arithmetic_policy, tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = run(["collect", arithmetic_policy, *COLLECT, "--round", "2", "--output", str(out)])
    task = get_task("arithmetic")
    assert len(rows) == 24 and [r["prompt"] for r in rows[::2]] == list(dict.fromkeys(task.dataset()["prompt"]))[:12]
    assert all(r["round"] == 2 and r["policy"] == arithmetic_policy and r["strategy"].startswith("sample") for r in rows)
    completions = ["".join(r["steps"]) for r in rows]
    assert [r["reward"] for r in rows] == task.score([r["prompt"] for r in rows], completions)["reward"]
    loaded = load_rows(str(out))
    assert set(PROVENANCE_COLUMNS) <= set(loaded.column_names)
    tokenized = tokenize_dataset(loaded, task.tokenizer(), max_length=64)
    tokenizer = task.tokenizer()
    for row, tok in zip(rows, tokenized):
        # every completion token and the EOS act; step rewards on the last token of each step, the outcome on the EOS
        n_completion = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in row["steps"]) + 1
        assert sum(tok["action_mask"]) == n_completion
        assert sum(tok["rewards"]) == pytest.approx(sum(row["step_rewards"]) + row["reward"])
        assert tok["terminated"]


def test_a_plain_lm_is_only_sampled_plainly(arithmetic_policy, tmp_path):
    with pytest.raises(SystemExit, match="plain causal LM"):
        run(["collect", arithmetic_policy, *COLLECT, "--beta", "4", "--output", str(tmp_path / "x.jsonl")])
    with pytest.raises(ValueError, match="exactly one of --task"):
        run(["collect", arithmetic_policy, "--output", str(tmp_path / "x.jsonl")])


def test_collect_with_your_reward_on_a_prompts_file(arithmetic_policy, tmp_path):
    (tmp_path / "prompts.txt").write_text("1+2=\n3+4=\n")
    (tmp_path / "reward.py").write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    rows = run(["collect", arithmetic_policy, "--prompts_file", str(tmp_path / "prompts.txt"), "--reward_fn",
                f"{tmp_path / 'reward.py'}:length", "--max_new_tokens", "5", "--output", str(tmp_path / "rows.jsonl")])
    assert [r["prompt"] for r in rows] == ["1+2=", "3+4="]
    assert all(r["reward"] == len(r["completion"]) for r in rows)  # outcome rows: this task has no process rewards
    tokenize_dataset(load_rows(str(tmp_path / "rows.jsonl")), get_task("arithmetic").tokenizer(), max_length=64)


@pytest.mark.slow
def test_two_processes_collect_the_same_rows_as_one(arithmetic_policy, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"rows{processes}.jsonl"
        launcher = [sys.executable, "-m", "tokenq"] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"), "-m", "tokenq"]
        done = subprocess.run([*launcher, "collect", arithmetic_policy, *COLLECT, "--output", str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"on {processes} process(es)" in done.stdout  # the world size the rows were collected with
        outputs[processes] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs[2]) == 24 and outputs[2] == outputs[1]  # row for row


def test_collect_with_a_tokenq_checkpoint_and_any_strategy(arithmetic_critic, tmp_path):
    for strategy in (["--strategy", "sample", "--beta", "4"], ["--strategy", "step_search", "--num_continuations", "2"]):
        rows = run(["collect", arithmetic_critic, *COLLECT, *strategy, "--output", str(tmp_path / "rows.jsonl")])
        assert len(rows) == 24 and rows[0]["strategy"].startswith(strategy[1])
