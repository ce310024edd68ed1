"""The headline figures over training seeds: mean, spread and each seed's value, with the CPU instruction set that
ran them (a figure that moves by 0.1 between machines is a sample, not a result).

    python scripts/headline_seeds.py --seeds 0 1 2 --json outputs/headline_seeds.json
    python scripts/headline_seeds.py --jobs randomwalks arithmetic --seeds 0 1 2        # some of the jobs

Jobs (each a README headline row; every run is the shipped config with `--seed SEED`, in this process, one after
the other; outputs under `--output_dir/JOB/seed_SEED`):
- `randomwalks`: the main job, `tokenq iql` (configs/iql_randomwalks.yaml): optimality at beta 100;
- `arithmetic`: `tokenq iql --config arithmetic`: exact-answer reward at beta 0 (the behaviour clone) and 100;
- `critic`: `tokenq value --config arithmetic_critic`: the policy plain and steered by its critic (beta 16);
- `scale`: `tokenq value --config arithmetic` then `tokenq scale` on it (best_of_n and dvts at N = 16, weighted
  vote), and the same cells with the `critic` job's policy steered by its critic (needs the `critic` job).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from tokenq.cli import run  # noqa: E402
from tokenq.reporting import write_json  # noqa: E402

JOBS = ("randomwalks", "arithmetic", "critic", "scale")
SCALE = ["--task", "arithmetic", "--budgets", "16", "--eval_strategies", "best_of_n", "dvts", "--votes", "weighted"]


def at_beta(metrics: dict, beta: float) -> float:
    return next(r["reward"] for r in metrics["eval"] if r.get("beta") == beta)


def scale_cells(rows: list[dict], prefix: str) -> dict:
    """`{prefix}_{strategy}_{vote}16`: the N = 16 cells of a `tokenq scale` run."""
    return {f"{prefix}_{r['strategy']}_{r['vote'] or 'best'}16": r["reward"] for r in rows if r["budget"] == 16}


def one_seed(job: str, seed: int, out: Path) -> dict:
    """The job's figures for one training seed."""
    common = ["--seed", str(seed), "--disable_tqdm", "true", "--overwrite", "true"]
    if job == "randomwalks":
        return {"optimality_beta100": at_beta(run(["iql", *common, "--output_dir", str(out)]), 100)}
    if job == "arithmetic":
        metrics = run(["iql", "--config", "arithmetic", *common, "--output_dir", str(out)])
        return {"reward_beta0": at_beta(metrics, 0), "reward_beta100": at_beta(metrics, 100)}
    if job == "critic":
        metrics = run(["value", "--config", "arithmetic_critic", *common, "--output_dir", str(out)])
        return {"plain_reward": metrics["plain_reward"], "guided_reward": metrics["guided_reward"]}
    run(["value", "--config", "arithmetic", *common, "--output_dir", str(out / "value")])
    figures = scale_cells(run(["scale", str(out / "value"), *SCALE, "--seed", str(seed), "--output_dir", str(out / "scale")]),
                          "value_arithmetic")
    critic = out.parent.parent / "critic" / f"seed_{seed}"
    if (critic / "metrics.json").is_file():
        rows = run(["scale", str(critic / "policy"), "--critic", str(critic), *SCALE, "--seed", str(seed),
                    "--output_dir", str(out / "scale_critic")])
        figures.update(scale_cells(rows, "critic"))
    return figures


def summary(runs: list[dict]) -> dict:
    """Per figure: mean, sample standard deviation, min, max, and the per-seed values."""
    out = {}
    for key in runs[0]["figures"]:
        values = [r["figures"][key] for r in runs if key in r["figures"]]
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "values": values}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default="outputs/headline_seeds")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cpu = torch.backends.cpu.get_cpu_capability()
    results = {"cpu_capability": cpu, "seeds": args.seeds, "jobs": {}}
    for job in sorted(args.jobs, key=JOBS.index):  # scale reads the critic job's outputs
        runs = []
        for seed in args.seeds:
            start = time.time()
            figures = one_seed(job, seed, Path(args.output_dir) / job / f"seed_{seed}")
            runs.append({"seed": seed, "figures": figures, "wall_time_s": time.time() - start})
        results["jobs"][job] = {"runs": runs, "summary": summary(runs)}
        if args.json:
            write_json(args.json, results)
    print(f"\nheadline figures over training seeds {args.seeds} (torch CPU kernels: {cpu})\n")
    print("| job | figure | mean ± std | min – max | per seed | wall time per seed |\n|---|---|---:|---:|---|---:|")
    for job, result in results["jobs"].items():
        seconds = statistics.mean(r["wall_time_s"] for r in result["runs"])
        for key, s in result["summary"].items():
            print(f"| {job} | {key} | {s['mean']:.3f} ± {s['std']:.3f} | {s['min']:.3f} – {s['max']:.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in s['values'])} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
