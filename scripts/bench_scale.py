"""Data parallelism on CPU: 1 process vs 2 processes (gloo DDP, launched with the shipped accelerate config)
at the same global batch. Prints tokens/s and peak RSS per process, and the max |delta| of the final weights
between the two runs (token-exact losses: they train the same model).

    python scripts/bench_scale.py --json outputs/bench_scale.json
    python scripts/bench_scale.py --steps 20 --global_batch 32 --n_layer 4 --n_embd 256

Each run is `scripts/scale_run.py` (IQL on rows of 1-24 action tokens). On 2 cores two processes share the
machine, so tokens/s measures the overhead of data parallelism here more than its speed-up on real devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from tokenq.reporting import write_json

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, processes: int, args) -> list[dict]:
    common = ["--out", str(out), "--steps", str(args.steps), "--global_batch", str(args.global_batch),
              "--per_device_batch", str(args.global_batch // processes), "--n_layer", str(args.n_layer),
              "--n_embd", str(args.n_embd)]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml")]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}
    subprocess.run([*launcher, str(ROOT / "scripts" / "scale_run.py"), *common], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, two = run(Path(tmp) / "one", 1, args), run(Path(tmp) / "two", 2, args)
        w1, w2 = load_file(Path(tmp) / "one" / "rank0.safetensors"), load_file(Path(tmp) / "two" / "rank0.safetensors")
    delta = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    result = {
        "steps": args.steps, "global_batch": args.global_batch, "n_layer": args.n_layer, "n_embd": args.n_embd,
        "one_process": {"tokens_per_s": one[0]["tokens_per_s"], "peak_rss_mb": one[0]["peak_rss_mb"]},
        "two_processes": {"world_size": two[0]["world_size"], "tokens_per_s": two[0]["tokens_per_s"],
                          "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in two]},
        "tokens_per_s_ratio": two[0]["tokens_per_s"] / one[0]["tokens_per_s"],
        "max_abs_weight_delta": delta,
    }
    print(f"1 process : {one[0]['tokens_per_s']:8.0f} tokens/s, peak RSS {one[0]['peak_rss_mb']:.0f} MB")
    print(f"2 processes (world size {two[0]['world_size']}): {two[0]['tokens_per_s']:8.0f} tokens/s, peak RSS per process "
          + ", ".join(f"{r['peak_rss_mb']:.0f} MB" for r in two))
    print(f"tokens/s 2 / 1 = {result['tokens_per_s_ratio']:.3f}; max |delta| of the weights = {delta:.3g}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
