"""Checkpoints are whole or absent: Trainer checkpoints are written under a temporary name and renamed into place;
a failed save (full disk, SIGTERM, SIGINT) leaves nothing partial; `resume_from_checkpoint=True` takes the latest
whole checkpoint and names the ones it skips; unreadable training state is named."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset

from tests.conftest import tiny_gpt2
from tests.test_trainers import ROWS, _args
from tests.test_user_task import user_files  # noqa: F401  (fixture)
from tokenq.atomic import TMP_PREFIX, replace_file, staged_folder
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import IQLTrainer
from tokenq.trainers.resume import checkpoint_problems, latest_complete_checkpoint


def _trainer(tokenizer, out, **kw):
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=3), TokenQConfig())
    args = _args(out, **{"save_strategy": "steps", "save_steps": 1, "lr_scheduler_type": "constant", **kw})
    return IQLTrainer(model, args, Dataset.from_list(ROWS), tokenizer)


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(f"{TMP_PREFIX}*"))


def test_checkpoints_are_whole_and_rotated(tokenizer, tmp_path):
    _trainer(tokenizer, tmp_path, max_steps=4, save_total_limit=2).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not _leftovers(tmp_path)
    assert all(checkpoint_problems(p) == [] for p in tmp_path.glob("checkpoint-*"))
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_full_disk_during_a_save_leaves_no_partial_checkpoint(tokenizer, tmp_path, monkeypatch):
    saves = []
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the optimizer state of the 2nd checkpoint does not fit
        saves.append(str(f))
        if "checkpoint-2" in str(f) and "optimizer" in str(f):
            real_save(obj, f, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _trainer(tokenizer, tmp_path, max_steps=4).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not _leftovers(tmp_path) and checkpoint_problems(tmp_path / "checkpoint-1") == []
    with pytest.raises(OSError):  # a final save into a new folder: nothing at all is left
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        _trainer(tokenizer, tmp_path / "run", max_steps=1, save_strategy="no").save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists() and not _leftovers(tmp_path)


def _partial(src, dst, drop=None, truncate=None):
    shutil.copytree(src, dst)
    if drop:
        (dst / drop).unlink()
    if truncate:
        data = (dst / truncate).read_bytes()
        (dst / truncate).write_bytes(data[: len(data) // 2])
    return dst


def test_resume_true_takes_the_latest_whole_checkpoint_and_names_the_rest(tokenizer, tmp_path, caplog):
    _trainer(tokenizer, tmp_path, max_steps=2).train()
    _partial(tmp_path / "checkpoint-2", tmp_path / "checkpoint-3", drop="trainer_state.json")
    _partial(tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", drop="tokenq_heads.safetensors")
    _partial(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5", truncate="trainer_state.json")
    _partial(tmp_path / "checkpoint-2", tmp_path / "checkpoint-6", drop="optimizer.pt")
    latest, skipped = latest_complete_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-2"
    assert [p.name for p in skipped] == ["checkpoint-6", "checkpoint-5", "checkpoint-4", "checkpoint-3"]
    assert "optimizer" in skipped[tmp_path / "checkpoint-6"][0]
    assert "trainer_state.json is truncated or not valid JSON" in skipped[tmp_path / "checkpoint-5"][0]
    assert "tokenq_heads.safetensors" in skipped[tmp_path / "checkpoint-4"][0]
    assert "trainer_state.json is missing" in skipped[tmp_path / "checkpoint-3"][0]

    trainer = _trainer(tokenizer, tmp_path, max_steps=3)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=True)
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text and "resuming from" in caplog.text
    steps = [h["step"] for h in trainer.state.log_history if "loss/q" in h]
    assert steps == [1, 2, 3]  # steps 1-2 from checkpoint-2's state, then one step: resumed from step 2

    for name, pattern in (("checkpoint-5", r"trainer_state.json is truncated"), ("checkpoint-4", r"tokenq_heads")):
        with pytest.raises(ValueError, match=rf"--resume_from_checkpoint .*{name}: not a whole checkpoint.*{pattern}"):
            _trainer(tokenizer, tmp_path, max_steps=3).train(resume_from_checkpoint=str(tmp_path / name))


def test_resume_true_without_a_whole_checkpoint_says_so(tokenizer, tmp_path):
    _trainer(tokenizer, tmp_path, max_steps=1).train()
    (tmp_path / "checkpoint-1" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"no whole checkpoint-\* in .*skipped checkpoint-1"):
        _trainer(tokenizer, tmp_path, max_steps=2).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("file", ["optimizer.pt", "rng_state.pth"])
def test_unreadable_training_state_is_named(tokenizer, tmp_path, file):
    _trainer(tokenizer, tmp_path, max_steps=1).train()
    data = (tmp_path / "checkpoint-1" / file).read_bytes()
    (tmp_path / "checkpoint-1" / file).write_bytes(data[:100])
    with pytest.raises(ValueError, match=rf"checkpoint-1: .*{file.split('.')[0].split('_')[0]}.*cannot be read"):
        _trainer(tokenizer, tmp_path, max_steps=2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_staged_writes_leave_the_target_untouched_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"] and not _leftovers(tmp_path)
    with staged_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"] and not _leftovers(tmp_path)
    with pytest.raises(OSError):
        replace_file(tmp_path / "out" / "new.txt", lambda t: (t.write_text("half"), (_ for _ in ()).throw(OSError("full"))))
    assert (tmp_path / "out" / "new.txt").read_text() == "new" and not _leftovers(tmp_path)


SLOW_SAVES = """
import sys, time, torch
real_save = torch.save
def slow_save(*args, **kwargs):  # a save that takes long enough to be interrupted in the middle
    time.sleep(0.4)
    return real_save(*args, **kwargs)
torch.save = slow_save
from tokenq.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # two `tokenq iql` processes each (about 25 s): end to end, run by .ci/run
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_save_leaves_no_partial_checkpoint_and_the_run_resumes(tmp_path, llama_dir, user_files, signum):
    """Real processes: `tokenq iql` saving every step is signalled while a checkpoint is being written; it stops
    within seconds, leaves only whole checkpoints, and `--resume_from_checkpoint true` continues from the latest."""
    rows, held, _ = user_files
    out = tmp_path / "out"
    command = [sys.executable, "-c", SLOW_SAVES, "iql", "--model_name_or_path", llama_dir, "--dataset_name", rows,
               "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
               "--per_device_train_batch_size", "4", "--logging_steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--max_steps", "200"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # the 2nd checkpoint is being written
        if any(p.name.startswith(f"{TMP_PREFIX}checkpoint-2") for p in out.glob(f"{TMP_PREFIX}*")):
            break
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signum)
    sent = time.time()
    output, _ = proc.communicate(timeout=60)
    assert time.time() - sent < 10, "did not stop promptly"
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), output[-3000:]
    assert "no partial checkpoint was left" in output and f"stopped by {signal.Signals(signum).name}" in output
    assert not _leftovers(out), _leftovers(out)
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints == [out / "checkpoint-1"], checkpoints  # checkpoint-2 was being written: absent
    assert checkpoint_problems(checkpoints[0]) == []
    latest = 1

    done = subprocess.run([*command, "--max_steps", str(latest + 1), "--resume_from_checkpoint", "true"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / f"checkpoint-{latest + 1}" / "trainer_state.json").read_text())
    assert state["global_step"] == latest + 1
    assert [h["step"] for h in state["log_history"] if "loss/q" in h] == list(range(1, latest + 2))
