"""A user's own task from files: rows, held-out rows and a reward function, through the `tokenq` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_recipes import _recipe

REWARD = """
def score(prompts, completions):
    return [float(c.endswith("!")) for c in completions]

def too_few(prompts, completions):
    return [1.0] * (len(completions) - 1)

def not_finite(prompts, completions):
    return [float("nan")] * len(completions)

def words(prompts, completions):
    return ["good"] * len(completions)

def broken(prompts, completions):
    raise KeyError("answer")
"""


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def user_files(tmp_path):
    """rows.jsonl (prompts a..t), held.jsonl (other prompts), reward.py: an exclamation mark at the end earns 1."""
    rows = [{"prompt": f"q{p}", "completion": c, "reward": float(c.endswith("!"))}
            for p in "abcdefghijklmnopqrst" for c in ("ok!", "no", "fine!", "bad")]
    held = [{"prompt": f"q{p}", "completion": c, "reward": float(c.endswith("!"))} for p in "uvwxyz" for c in ("ok!", "no")]
    (tmp_path / "reward.py").write_text(REWARD)
    return _jsonl(tmp_path / "rows.jsonl", rows), _jsonl(tmp_path / "held.jsonl", held), str(tmp_path / "reward.py")


def test_tokenq_iql_on_a_users_task_from_files(tmp_path, llama_dir, user_files):
    """The issue's command, in a subprocess; everything else is the default config for a user's data."""
    rows, held, reward = user_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tokenq", "iql", "--model_name_or_path", llama_dir, "--dataset_name", rows,
                           "--eval_dataset", held, "--reward_fn", f"{reward}:score", "--max_steps", "20", "--output_dir", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["task"].endswith("held") and metrics["behavior_reward"] == pytest.approx(0.5)  # held-out rows' rewards
    assert [r["beta"] for r in metrics["eval"]] == [0, 1, 4, 16]  # configs/iql_dataset.yaml
    assert all(0 <= r["reward"] <= 1 and r["generated_tokens"] > 0 for r in metrics["eval"])
    diagnostics = metrics["value_diagnostics"]
    assert diagnostics["rows"] == 12 and diagnostics["v0"]["roc_auc"] is not None and "td_mse" in diagnostics
    assert (tmp_path / "out" / "reward_vs_beta.png").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| data (behaviour) | | 0.500 |" in card and "| held-out q_mse |" in card and "datasets:" not in card
    assert "| data (behaviour) | | 0.500 |" in done.stdout
    said = metrics["verdict"]  # 20 steps on 12 held-out rows: whatever it finds, it says it, in every place
    assert isinstance(said["value_learned"], bool) and isinstance(said["guidance_helps"], bool)
    assert said["value"]["rows"] == 12 and said["guidance"]["configurations"] == 3  # betas 1, 4, 16 against 0
    assert f"verdict: {said['message']}" in done.stdout and f"**Verdict.** {said['message']}" in card
    assert done.stdout.index("verdict:") < done.stdout.index("| data (behaviour)")


@pytest.mark.parametrize("name, error, message", [
    ("missing", FileNotFoundError, r"--reward_fn .*nothere\.py:score: no such file"),
    ("nope", ValueError, r"has no 'nope' \(callables there: \['broken', 'not_finite', 'score', 'too_few', 'words'\]\)"),
    ("too_few", ValueError, r"reward\.py:too_few returned 3 values for 'reward' for 4 completions"),
    ("not_finite", ValueError, r"reward\.py:not_finite returned nan for 'reward' of completion 0"),
    ("words", ValueError, r"reward\.py:words returned 'good' for 'reward' of completion 0"),
    ("broken", ValueError, r"reward\.py:broken raised KeyError: 'answer'"),
])
def test_a_bad_reward_function_fails_before_any_training_step(tmp_path, llama_dir, user_files, name, error, message):
    rows, held, reward = user_files
    spec = f"{tmp_path / 'nothere.py'}:score" if name == "missing" else f"{reward}:{name}"
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_dataset", held,
                                "--reward_fn", spec, "--output_dir", str(out), "--max_steps", "2"])
    assert not out.exists()  # nothing was trained or written


def test_eval_split_holds_out_prompts_and_reward_fn_needs_them(tmp_path, llama_dir, user_files):
    rows, _, reward = user_files
    out = tmp_path / "out"
    metrics = _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_split", "0.1",
                                      "--reward_fn", f"{reward}:score", "--output_dir", str(out), "--max_steps", "2",
                                      "--eval_betas", "0", "4", "--eval_strategy", "no"])
    assert metrics["value_diagnostics"]["rows"] == 8  # 2 of the 20 prompts, 4 rows each
    with pytest.raises(ValueError, match="--reward_fn needs held-out prompts"):
        _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_split", "0",
                                "--reward_fn", f"{reward}:score", "--output_dir", str(out / "x")])
    with pytest.raises(ValueError, match="--reward_fn is for your own data .* has its own reward"):
        _recipe("iql_lm").main(["--task", "arithmetic", "--reward_fn", f"{reward}:score", "--output_dir", str(out / "y")])
    with pytest.raises(ValueError, match="--answer_fn is for your own data .* has its own answer"):
        _recipe("iql_lm").main(["--task", "arithmetic", "--answer_fn", f"{reward}:score", "--output_dir", str(out / "y")])


def test_held_out_rows_without_a_reward_function_still_get_value_diagnostics(tmp_path, llama_dir, user_files):
    rows, held, _ = user_files
    metrics = _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_dataset", held,
                                      "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--eval_strategy", "no"])
    assert "eval" not in metrics and metrics["behavior_reward"] is None
    assert metrics["value_diagnostics"]["rows"] == 12


def test_eval_and_sweep_on_a_users_task(tmp_path, llama_dir, user_files):
    rows, held, reward = user_files
    ckpt = tmp_path / "ckpt"
    _recipe("iql_lm").main(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_dataset", held,
                            "--output_dir", str(ckpt), "--max_steps", "2", "--eval_strategy", "no"])
    from tokenq.cli import run

    task = ["--eval_dataset", held, "--reward_fn", f"{reward}:score", "--eval_samples_per_prompt", "1"]
    rows_eval = run(["eval", str(ckpt), *task, "--eval_betas", "0", "2"])
    saved = json.loads((ckpt / "eval_metrics.json").read_text())
    assert [r["beta"] for r in rows_eval] == [0, 2] and saved["task"].endswith("held")
    assert saved["verdict"]["value"]["rows"] == 12 and saved["verdict"]["guidance"]["configurations"] == 1
    rows_sweep = run(["sweep", str(ckpt), *task, "--eval_betas", "1", "--eval_num_beams", "2", "--eval_num_candidates", "2",
                      "--eval_num_continuations", "2"])
    assert [r["strategy"] for r in rows_sweep] == ["sample", "greedy", "beam", "best_of_n", "resample", "step_search", "dvts",
                                                   "astar", "mcts"]
    answer = tmp_path / "answer.py"
    answer.write_text("def last_word(completion):\n    return completion.split()[-1] if completion.split() else ''\n")
    scaled = run(["scale", str(ckpt), *task, "--answer_fn", f"{answer}:last_word", "--budgets", "1", "2",
                  "--eval_strategies", "best_of_n", "astar", "--eval_num_continuations", "2", "--output_dir", str(tmp_path / "scale")])
    assert {(r["strategy"], r["budget"], r["vote"]) for r in scaled} == {
        ("best_of_n", b, v) for b in (1, 2) for v in (None, "majority", "weighted")} | {("astar", 1, None), ("astar", 2, None)}
    generated = run(["generate", str(ckpt), "--prompt", "qu", "--strategy", "best_of_n", "--num_candidates", "3",
                     "--reward_fn", f"{reward}:score", "--max_new_tokens", "4"])
    assert set(generated[0]) == {"prompt", "completion", "reward", "generated_tokens", "forward_rows"}
    with pytest.raises(SystemExit, match="name the task"):
        run(["eval", str(ckpt)])


@pytest.mark.parametrize("command", ["value", "dqo"])
def test_value_and_dqo_run_end_to_end_on_your_data_with_their_default_config(tmp_path, llama_dir, user_files, command):
    """Your rows, held-out rows and reward function, and nothing else but a short budget: the command's config for your
    data (configs/{value,dqo}_dataset.yaml) trains, evaluates during training and at the end, and writes its metrics."""
    from tokenq.cli import run

    rows, held, reward = user_files
    out = tmp_path / command
    metrics = run([command, "--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_dataset", held,
                   "--reward_fn", f"{reward}:score", "--max_steps", "4", "--eval_steps", "2", "--eval_samples_per_prompt", "1",
                   "--output_dir", str(out)])
    assert metrics["task"].endswith("held") and metrics["eval"] and metrics["value_diagnostics"]["rows"] == 12
    assert json.loads((out / "metrics.json").read_text())["eval"] == metrics["eval"]
