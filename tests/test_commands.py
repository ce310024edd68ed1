"""Every command on both built-in tasks (tiny, fast versions), through `tokenq.cli.run` as the console script runs
them: iql, value, dqo, eval, sweep, generate on randomwalks and arithmetic."""

import json

import pytest

from tokenq.cli import run

TASKS = ["randomwalks", "arithmetic"]
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--per_device_train_batch_size", "16", "--max_steps", "2",
        "--bc_steps", "2", "--eval_samples_per_prompt", "1", "--eval_strategy", "no", "--use_cpu", "true",
        "--disable_tqdm", "true", "--logging_steps", "1"]
EXTRAS = {"randomwalks": {"optimality", "length", "reached"}, "arithmetic": {"steps_correct"}}


@pytest.fixture(scope="module", params=TASKS)
def trained(request, tmp_path_factory):
    """`tokenq iql --task TASK` (its own config: iql_randomwalks.yaml / iql_arithmetic.yaml)."""
    out = tmp_path_factory.mktemp(request.param) / "iql"
    metrics = run(["iql", "--task", request.param, "--output_dir", str(out), *TINY, "--eval_betas", "0", "8"])
    return request.param, out, metrics


def test_iql(trained):
    task, out, metrics = trained
    assert metrics["task"] == task and [r["beta"] for r in metrics["eval"]] == [0, 8]
    assert EXTRAS[task] <= set(metrics["eval"][0]) and metrics["value_diagnostics"]["rows"] == 200
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["behavior_reward"] == pytest.approx({"randomwalks": 0.3515, "arithmetic": 0.4285}[task], abs=1e-3)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("command", ["value", "dqo"])
def test_value_and_dqo(tmp_path, task, command):
    metrics = run([command, "--task", task, "--output_dir", str(tmp_path), *TINY])
    assert metrics["task"] == task and EXTRAS[task] <= set(metrics["eval"][0])
    assert all(0 <= r["reward"] <= 1 for r in metrics["eval"]) and metrics["value_diagnostics"]["rows"] == 200
    assert json.loads((tmp_path / "metrics.json").read_text())["eval"] == metrics["eval"]


def test_eval(trained, tmp_path):
    task, out, _ = trained
    rows = run(["eval", str(out), "--task", task, "--eval_betas", "0", "4", "--eval_samples_per_prompt", "1",
                "--output_dir", str(tmp_path)])
    assert [r["beta"] for r in rows] == [0, 4] and EXTRAS[task] <= set(rows[0])
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["task"] == task


def test_sweep(trained, tmp_path):
    task, out, _ = trained
    rows = run(["sweep", str(out), "--task", task, "--eval_betas", "2", "--eval_num_beams", "2", "--eval_num_candidates", "2",
                "--eval_num_continuations", "2", "--eval_samples_per_prompt", "1", "--output_dir", str(tmp_path)])
    assert [r["strategy"] for r in rows] == ["sample", "greedy", "beam", "best_of_n", "resample", "step_search", "dvts",
                                             "astar", "mcts"]
    assert all(EXTRAS[task] <= set(r) for r in rows)
    step = {"randomwalks": {"step_tokens": 1}, "arithmetic": {"step_stop_strings": [";"]}}[task]  # config / task's steps
    assert all(step.items() <= r.items() for r in rows[5:])


def test_scale(trained, tmp_path):
    """Every strategy at each budget; votes where the task has an `answer` (arithmetic, not randomwalks)."""
    task, out, _ = trained
    rows = run(["scale", str(out), "--task", task, "--budgets", "1", "2", "--eval_max_prompts", "3", "--eval_samples_per_prompt",
                "1", "--eval_num_continuations", "2", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "scale_metrics.json").read_text())
    assert saved["rows"] == rows and saved["task"] == task
    keys = ["strategy", "budget", "vote", "aggregate", "reward", *EXTRAS[task], "generated_tokens", "forward_rows", "seconds"]
    assert all(set(keys) <= set(r) for r in rows)
    cells = {(r["strategy"], r["budget"], r["vote"]) for r in rows}
    votes = [None, "majority", "weighted"] if task == "arithmetic" else [None]
    assert ("beam", 2, None) in cells and ("beam", 1, None) not in cells  # one beam is greedy decoding
    for strategy in ["best_of_n", "resample", "step_search", "dvts", "astar", "mcts"]:
        for budget in (1, 2):
            assert (strategy, budget, None) in cells
            if strategy in ("best_of_n", "resample", "dvts"):
                assert all((strategy, budget, v) in cells for v in votes)
    assert ("sample", 1, None) in cells and ("sample", 2, None) not in cells
    assert all(r["generated_tokens"] > 0 and r["forward_rows"] > 0 and r["seconds"] > 0 for r in rows)
    assert (tmp_path / "reward_vs_tokens.png").stat().st_size > 0 and (tmp_path / "reward_vs_seconds.png").stat().st_size > 0


@pytest.mark.parametrize("strategy", ["sample", "beam", "step_search"])
def test_generate(trained, strategy):
    task, out, _ = trained
    prompt = {"randomwalks": "b", "arithmetic": "1+2+3+4="}[task]
    rows = run(["generate", str(out), "--prompt", prompt, "--strategy", strategy, "--beta", "1", "--max_new_tokens", "8",
                "--num_beams", "2", "--num_continuations", "2"])
    assert rows[0]["prompt"] == prompt and 0 < rows[0]["generated_tokens"] and rows[0]["forward_rows"] > 0
