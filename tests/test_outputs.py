"""Nothing a user already has is replaced without `--overwrite true`, through the commands a user runs: each command
that writes outputs, run twice on one output, resumes or exits with an error naming the path and the flag, and the
first run's files stay byte for byte as they were."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_bad_inputs import _snapshot
from tokenq.cli import main, run
from tokenq.outputs import claim_file, claim_output_dir, exclusive, resume_value

ROOT = Path(__file__).resolve().parent.parent
COLLECT = ["--task", "arithmetic", "--max_prompts", "4", "--num_samples", "2", "--batch_size", "8", "--seed", "3"]
IQL = ["--task", "arithmetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--bc_steps", "0", "--max_steps", "2",
       "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--eval_betas", "0", "--eval_samples_per_prompt", "1",
       "--eval_max_prompts", "2", "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true"]


def test_claims_refuse_what_exists_unless_resuming_or_overwriting(tmp_path):
    (tmp_path / "rows.jsonl").write_text("old\n")
    with pytest.raises(SystemExit, match=r"rows.jsonl already exists: pass --overwrite true"):
        claim_file(tmp_path / "rows.jsonl", overwrite=False, command="collect")
    assert claim_file(tmp_path / "rows.jsonl", overwrite=True, command="collect") == tmp_path / "rows.jsonl"
    out = tmp_path / "run"
    assert claim_output_dir(out, overwrite=False, resume=None, command="iql") == out  # absent: fine
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"holds an earlier run's outputs \(checkpoint-2, metrics.json\).*--overwrite true.*"
                                         r"--resume_from_checkpoint true"):
        claim_output_dir(out, overwrite=False, resume=None, command="iql")
    claim_output_dir(out, overwrite=False, resume="true", command="iql")  # resuming is not overwriting
    assert (out / "checkpoint-2").is_dir()
    claim_output_dir(out, overwrite=True, resume=None, command="iql")  # the earlier run's checkpoints go
    assert not (out / "checkpoint-2").exists() and (out / "metrics.json").is_file()
    (tmp_path / "critic" / "policy").mkdir(parents=True)
    claim_output_dir(tmp_path / "critic", overwrite=False, resume=None, command="value", inputs=("policy",))
    assert [resume_value(v) for v in ("true", "False", "", None, "ckpt")] == [True, False, None, None, "ckpt"]


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` (as a running `tokenq iterate` does)."""
    code = ("import sys, time; from tokenq.outputs import exclusive\n"
            f"with exclusive({str(folder)!r}, 'iterate'):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_second_process_on_one_folder_is_refused_and_a_crash_frees_it(tmp_path):
    folder = tmp_path / "loop"
    holder = _hold(folder)
    try:
        with pytest.raises(SystemExit, match=r"another process is running on .*loop"):
            with exclusive(folder, "iterate"):
                pass
        with pytest.raises(SystemExit, match=r"tokenq iterate: another process is running on .*loop"):
            run(["iterate", "--task", "arithmetic", "--output_dir", str(folder)])
        assert not folder.exists()  # the lock is beside the folder, taken before the folder is made
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the system releases the lock
        holder.wait()
    with exclusive(folder, "iterate"):
        pass


def test_collect_twice_keeps_the_first_rows_and_no_rows_writes_nothing(arithmetic_policy, tmp_path):
    out = tmp_path / "rows.jsonl"
    first = run(["collect", arithmetic_policy, *COLLECT, "--output", str(out)])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match=r"rows.jsonl already exists: pass --overwrite true"):
        run(["collect", arithmetic_policy, *COLLECT, "--seed", "4", "--output", str(out)])
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match=r"--max_prompts must be >= 1, got 0"):
        run(["collect", arithmetic_policy, *COLLECT, "--max_prompts", "0", "--overwrite", "true", "--output", str(out)])
    assert out.read_bytes() == before
    again = run(["collect", arithmetic_policy, *COLLECT, "--seed", "4", "--overwrite", "true", "--output", str(out)])
    assert len(again) == len(first) and out.read_bytes() == "".join(json.dumps(r) + "\n" for r in again).encode()
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="prompts.txt holds no prompt"):
        run(["collect", arithmetic_policy, "--prompts_file", str(empty), "--reward_fn", "tokenq.tasks:get_task",
             "--output", str(tmp_path / "none.jsonl")])
    assert not (tmp_path / "none.jsonl").exists()


def test_iql_twice_on_one_folder_resumes_or_refuses(tmp_path):
    out = tmp_path / "iql"
    run(["iql", *IQL, "--output_dir", str(out)])
    before = _snapshot(out)
    with pytest.raises(SystemExit, match=r"iql: .* holds an earlier run's outputs .*--resume_from_checkpoint true"):
        run(["iql", *IQL, "--output_dir", str(out)])
    assert _snapshot(out) == before
    resumed = run(["iql", *IQL, "--max_steps", "3", "--resume_from_checkpoint", "true", "--output_dir", str(out)])
    assert resumed["train_steps"] == 3 and (out / "checkpoint-3").is_dir()
    replaced = run(["iql", *IQL, "--overwrite", "true", "--output_dir", str(out)])
    assert replaced["train_steps"] == 2 and not (out / "checkpoint-3").exists()  # the earlier run's checkpoints went


def test_extract_resumes_with_true_and_refuses_a_silent_restart(arithmetic_critic, tmp_path):
    out = tmp_path / "extract"
    common = ["extract", arithmetic_critic, "--task", "arithmetic", "--method", "awr", "--eval_samples_per_prompt", "1",
              "--eval_max_prompts", "2", "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps",
              "1", "--output_dir", str(out)]
    run([*common, "--max_steps", "2"])
    before = _snapshot(out)
    with pytest.raises(SystemExit, match=r"extract: .* holds an earlier run's outputs"):
        run([*common, "--max_steps", "2"])
    assert _snapshot(out) == before
    metrics = run([*common, "--max_steps", "3", "--resume_from_checkpoint", "true"])  # the command its stop message prints
    assert metrics["steps"] == 3


def test_scale_refuses_unknown_strategies_and_repeated_budgets(tmp_path):
    with pytest.raises(ValueError, match=r"--eval_strategies: unknown \['best_of_m'\]"):
        run(["scale", "ckpt", "--task", "arithmetic", "--eval_strategies", "best_of_m"])
    with pytest.raises(ValueError, match=r"--budgets: \[4\] given more than once"):
        run(["scale", "ckpt", "--task", "arithmetic", "--budgets", "1", "4", "4"])
    with pytest.raises(ValueError, match=r"--eval_betas: \[1.0\] given more than once"):
        run(["sweep", "ckpt", "--task", "arithmetic", "--eval_betas", "1", "1"])


def test_a_policy_that_is_nowhere_is_one_line(tmp_path):
    missing = str(tmp_path / "no" / "such-policy")
    line = f"tokenq: {missing}: no such local folder, and the Hub is not reachable: offline mode (HF_HUB_OFFLINE)"
    for argv in (["collect", missing, *COLLECT, "--output", str(tmp_path / "x.jsonl")],
                 ["generate", missing, "--prompt", "1+2="],
                 ["value", "--config", "arithmetic_critic", "--policy", missing, "--output_dir", str(tmp_path / "c")]):
        with pytest.raises(SystemExit) as stop:  # the console script's exit: the message alone, no traceback
            main(argv)
        assert str(stop.value) == line
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "c" / "rollouts.jsonl").exists()


@pytest.mark.slow
def test_the_console_script_says_a_missing_policy_in_one_line(tmp_path):
    missing = str(tmp_path / "nowhere")
    done = subprocess.run([sys.executable, "-m", "tokenq", "collect", missing, *COLLECT], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"tokenq: {missing}: no such local folder")


def test_a_prompts_file_that_is_not_utf8_names_the_file(arithmetic_policy, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("1+2=\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--prompts_file .*prompts.txt: not UTF-8 text \(byte 8"):
        run(["collect", arithmetic_policy, "--prompts_file", str(bad), "--reward_fn", "tokenq.tasks:get_task",
             "--output", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_a_slow_reward_function_shows_progress(monkeypatch, capsys):
    import tokenq.tasks.reward as reward

    monkeypatch.setattr(reward, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(reward, "CHUNK", 2)
    calls = []

    def slow(prompts, completions):
        calls.append(len(completions))
        time.sleep(0.01)
        return [float(len(c)) for c in completions]

    scores = reward.RewardFunction(slow, "slow.py:slow")(["p"] * 5, ["a", "bb", "c", "dd", "e"])
    assert scores == {"reward": [1.0, 2.0, 1.0, 2.0, 1.0]} and calls == [2, 2, 1]
    err = capsys.readouterr().err
    assert "reward slow.py:slow" in err and "5/5" in err



def test_collect_with_every_rollin_ending_at_eos_writes_nothing(arithmetic_policy, tmp_path):
    """Q♯'s roll-in by a critic that wants EOS at once: the only roll-in (h >= 1 tokens for this seed) ends at EOS, no row
    remains to roll out, and the command says so before writing (it used to truncate --output and divide by zero)."""
    import torch
    from transformers import set_seed

    from tests.conftest import fixed_advantage_model
    from tokenq.tasks import get_task

    tokenizer = get_task("arithmetic").tokenizer()
    advantage = torch.zeros(len(tokenizer))
    advantage[tokenizer.eos_token_id] = 50.0
    critic = tmp_path / "eos_critic"
    fixed_advantage_model(tokenizer, advantage).save_pretrained(critic, tokenizer=tokenizer)
    seed = next(s for s in range(100) if set_seed(s) or torch.randint(0, 8, (1,)).item() >= 1)  # h >= 1 for the one row
    (tmp_path / "prompts.txt").write_text("1+2=\n")
    out = tmp_path / "rows.jsonl"
    out.write_text("earlier rows\n")
    with pytest.raises(SystemExit, match=r"no rows were collected .*every roll-in ended at EOS.*nothing was written"):
        run(["collect", arithmetic_policy, "--critic", str(critic), "--rollin", "true", "--beta", "1", "--prompts_file",
             str(tmp_path / "prompts.txt"), "--reward_fn", "tokenq.tasks:get_task", "--max_new_tokens", "8", "--seed",
             str(seed), "--overwrite", "true", "--output", str(out)])
    assert out.read_text() == "earlier rows\n"
