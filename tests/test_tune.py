"""`tokenq tune`: the pruning rule and the sampler by hand, the search on a user's task with either backend, and the
winner reproduced by `tokenq iql --config DIR/best.yaml`."""

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from tests.test_user_task import user_files  # noqa: F401  (fixture)
from tokenq.scripts.iql import main as iql
from tokenq.scripts.tune import main as tune
from tokenq.tune import OBJECTIVE, Halving, RandomTrial, TuneArguments, rungs, search_space


class Control:
    should_training_stop = False


class State:
    def __init__(self, step, max_steps=100):
        self.global_step, self.max_steps = step, max_steps


def test_halving_keeps_the_top_third_at_each_rung():
    seen = {}
    outcomes = []
    for value in (0.5, 0.2, 0.9, 0.4, 0.1, 0.95, 0.3):
        halving, control = Halving([10], seen), Control()
        halving.on_log(None, State(10), control, logs={OBJECTIVE: value})
        outcomes.append(halving.pruned)
    # n values so far -> the top max(1, n // 3) go on: 0.5 (alone), 0.2 < 0.5, 0.9 best, 0.4 (top 1 of 4 is 0.9),
    # 0.1, 0.95 (best), 0.3 (top 2 of 7: 0.95, 0.9)
    assert outcomes == [False, True, False, True, True, False, True]
    halving, control = Halving([10], seen), Control()
    halving.on_log(None, State(10, max_steps=10), control, logs={OBJECTIVE: 0.0})  # the last step: no rung
    assert not halving.pruned and not control.should_training_stop


def test_rungs_and_the_space():
    assert rungs(1200) == [134, 402, 1206] and rungs(18) == [3, 9, 27]
    trial = RandomTrial(0, random.Random(0))
    params = search_space(100)(trial)
    assert set(params) == {"learning_rate", "head_learning_rate", "max_steps", "tau"}  # TrainingArguments / IQLConfig
    assert set(trial.params) == {*params, "backbone", "q_rank"} and params["max_steps"] in (50, 100, 200)
    draws = [RandomTrial(0, random.Random(s)).suggest_float("lr", 1e-4, 1e-2, log=True) for s in range(200)]
    assert min(draws) >= 1e-4 and max(draws) <= 1e-2 and 0.3 < sum(d < 1e-3 for d in draws) / 200 < 0.7  # log-uniform
    with pytest.raises(ValueError, match="--n_trials must be >= 1"):
        TuneArguments(n_trials=0)


def test_builtin_search_and_the_winner_again(tmp_path, llama_dir, user_files):  # noqa: F811
    rows, held, reward = user_files
    data = ["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_dataset", held, "--reward_fn", f"{reward}:score"]
    out = tmp_path / "tune"
    metrics = tune([*data, "--max_steps", "20", "--n_trials", "2", "--eval_top", "1", "--backend", "builtin", "--eval_betas", "0", "4",
                    "--disable_tqdm", "true", "--output_dir", str(out)])
    trials = json.loads((out / "trials.json").read_text())
    assert [t["number"] for t in trials] == [0, 1] and trials[0]["state"] == "complete"  # the first trial is never pruned
    assert all({"params", "objective", "state", "seconds"} <= set(t) and t["state"] in ("complete", "pruned") for t in trials)
    assert all(t["steps"] < t["params"]["max_steps"] for t in trials if t["state"] == "pruned")
    assert len(list((out / "trials").iterdir())) == 1  # only the eval_top best finished models are kept
    said = metrics["verdict"]
    assert isinstance(said["value_learned"], bool) and isinstance(said["guidance_helps"], bool) and metrics["eval"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    winner = metrics["winner"]
    assert best["max_steps"] == winner["params"]["max_steps"] and best["q_rank"] == winner["params"]["q_rank"]
    assert best["use_peft"] == (winner["params"]["backbone"] == "lora") and best["reward_fn"] == f"{reward}:score"
    again = iql(["--config", str(out / "best.yaml"), "--output_dir", str(tmp_path / "again")])  # the same data flags are in it
    assert again["value_diagnostics"]["q"]["spearman"] == pytest.approx(winner["objective"], abs=1e-6)


def test_tune_refuses_without_held_out_rows(tmp_path, llama_dir, user_files):  # noqa: F811
    rows, _, reward = user_files
    with pytest.raises(ValueError, match="--eval_dataset FILE or --eval_split"):
        tune(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--eval_split", "0", "--reward_fn", f"{reward}:score",
              "--output_dir", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="--bc_steps 5: tokenq tune starts every trial from --model_name_or_path"):
        tune(["--model_name_or_path", llama_dir, "--dataset_name", rows, "--bc_steps", "5", "--output_dir", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()  # refused before anything was written


@pytest.mark.slow
def test_tokenq_tune_command_with_optuna(tmp_path, llama_dir, user_files):  # noqa: F811
    """As CI runs it: the command, 2 trials of 20 steps, Optuna's backend (Trainer.hyperparameter_search)."""
    pytest.importorskip("optuna")
    rows, held, reward = user_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tokenq", "tune", "--model_name_or_path", llama_dir, "--dataset_name", rows,
                           "--eval_dataset", held, "--reward_fn", f"{reward}:score", "--max_steps", "20", "--n_trials", "2",
                           "--backend", "optuna", "--output_dir", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert len(trials) == 2 and trials[0]["state"] == "complete" and trials[0]["objective"] is not None
    assert "verdict of the winner" in done.stdout and (tmp_path / "out" / "best.yaml").is_file()
    winner = json.loads((tmp_path / "out" / "metrics.json").read_text())["winner"]  # Trainer.hyperparameter_search's trial
    again = subprocess.run([sys.executable, "-m", "tokenq", "iql", "--config", "out/best.yaml", "--output_dir", "again"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # the same threads: the same sums
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["value_diagnostics"]["q"]["spearman"] == pytest.approx(winner["objective"], abs=1e-6)
