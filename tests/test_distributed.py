"""Real multi-process training: 2 gloo processes on CPU, launched as users launch them, against 1 process
on the same global batch (scripts/scale_run.py: 3 optimiser steps, global batch 8 of rows of 1-24 actions)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "scale_run.py")


def launch(out: Path, *argv: str, processes: int = 1, config: str = "ddp_cpu_2proc.yaml") -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, SCRIPT, "--out", str(out), *argv]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config), SCRIPT, "--out", str(out), *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


TERMS = ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "q/mean", "v/mean")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, launch(out, "--per_device_batch", "8")[0]


def test_ddp_on_cpu_equals_one_process(one_process, tmp_path):
    one_dir, one = one_process
    ranks = launch(tmp_path, "--per_device_batch", "4", "--save_steps", "1", processes=2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["dist_world_size"] == 2 and r["wrapped_by"] == "DistributedDataParallel" for r in ranks)
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert max_diff(w0, w1) == 0.0  # the ranks hold identical weights
    assert max_diff(w0, load_file(one_dir / "rank0.safetensors")) <= 1e-5  # = 1 process on the global batch
    assert len(ranks[0]["checkpoint_writes"]) == 4 and ranks[1]["checkpoint_writes"] == []  # one writer: 3 checkpoints + final
    # every Trainer checkpoint is whole (renamed into place once both ranks wrote their RNG state), nothing staged
    from tokenq.trainers.resume import checkpoint_problems

    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for p in checkpoints:
        assert checkpoint_problems(p) == [] and {"rng_state_0.pth", "rng_state_1.pth"} <= {f.name for f in p.iterdir()}, p
    assert not list((tmp_path / "run").rglob("_tokenq-tmp-*"))
    for step_one, step_two in zip(one["log_history"][:3], ranks[0]["log_history"][:3], strict=True):
        for term in TERMS:  # logged terms are global-batch values, not rank 0's half
            assert step_two[term] == pytest.approx(step_one[term], rel=1e-5, abs=1e-7), term


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *argv: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "scripts" / "fsdp2_cpu.py"), "--out", str(out), *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_fsdp2_on_cpu_equals_one_process_saves_one_checkpoint_and_resumes(one_process, tokenizer, tmp_path):
    from tests.test_checkpoint import assert_same_outputs
    from scripts.scale_run import tiny_model, tiny_tokenizer
    from tokenq import TokenQModel

    one_dir, _ = one_process
    ranks = torchrun(tmp_path / "fsdp2")
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["sharded_params"] == r["params"] for r in ranks)
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] < 1.01 * sum(  # each holds about half
        t.numel() for t in load_file(tmp_path / "fsdp2" / "gathered.safetensors").values())
    gathered = load_file(tmp_path / "fsdp2" / "gathered.safetensors")
    assert max_diff(gathered, load_file(one_dir / "rank0.safetensors")) <= 1e-5  # = Trainer, 1 process

    reloaded = TokenQModel.from_pretrained(str(tmp_path / "fsdp2" / "ckpt"))  # one process, no sharding
    reference = tiny_model(len(tiny_tokenizer()))
    reference.load_state_dict(gathered)
    assert_same_outputs(reference, reloaded, tiny_tokenizer())  # max |delta| = 0 on logits, V, Q, target Q

    resumed = torchrun(tmp_path / "resumed", "--resume", str(tmp_path / "fsdp2" / "ckpt"), "--steps", "1")
    assert max_diff(load_file(tmp_path / "resumed" / "restored.safetensors"), gathered) == 0.0
    assert len(resumed[0]["loss"]) == 1
