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
    generated = generated_tokens(arithmetic_policy, rows, batch_size=5, seed=3)
    specials = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    assert any(specials & set(ids) for ids in generated)  # the untrained policy emits <pad> / <unk> now and then
    assert {r["truncated"] for r in rows} == {True, False}  # some rows hit max_new_tokens, some ended with EOS
    for row, tok, ids in zip(rows, tokenized, generated):
        # the tokens trained on are the tokens generated (special tokens too); a row that ended acts its EOS last and
        # terminates, a row cut at the budget is a truncated episode (no EOS appended, not terminated)
        actions = [a for a, acting in zip(tok["input_ids"][1:], tok["action_mask"]) if acting]
        assert actions == ids + ([] if row["truncated"] else [tokenizer.eos_token_id])
        assert tok["terminated"] == (not row["truncated"])
        assert row["truncated"] == (len(ids) == task.max_new_tokens)
        assert sum(tok["rewards"]) == pytest.approx(sum(row["step_rewards"]) + row["reward"])


def generated_tokens(policy: str, rows: list[dict], batch_size: int, seed: int) -> list[list[int]]:
    """The token ids `tokenq collect` generated for `rows` (its chunks decoded again with their seeds)."""
    from transformers import set_seed

    from tokenq.evaluation import complete
    from tokenq.rollouts import load_policy

    task, model = get_task("arithmetic"), load_policy(policy)[0]
    prompts = [r["prompt"] for r in rows]
    ids = []
    for c, start in enumerate(range(0, len(prompts), batch_size)):
        set_seed(seed + c)
        _, stats = complete(model, task.tokenizer(), prompts[start : start + batch_size], task.max_new_tokens,
                            batch_size=batch_size, add_special_tokens=getattr(task, "prompt_add_special_tokens", True), strategy="sample",
                            beta=0.0, temperature=1.0, top_k=None, top_p=None)
        ids += stats["token_ids"]
    return ids


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
    tokenizer = get_task("arithmetic").tokenizer()  # the reward read the text without special tokens; the row keeps them
    read = [tokenizer.decode(tokenizer(r["completion"], add_special_tokens=False).input_ids, skip_special_tokens=True)
            for r in rows]
    assert [r["reward"] for r in rows] == [len(c) for c in read]  # outcome rows: this task has no process rewards
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
    for strategy in (["--strategy", "sample", "--beta", "4"], ["--strategy", "step_search", "--num_continuations", "2"],
                     ["--strategy", "resample", "--num_candidates", "2", "--resample_temperature", "0.5"]):
        rows = run(["collect", arithmetic_critic, *COLLECT, *strategy, "--output", str(tmp_path / f"{strategy[1]}.jsonl")])
        assert len(rows) == 24 and rows[0]["strategy"].startswith(strategy[1])
