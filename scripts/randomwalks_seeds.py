"""The default randomwalks recipe on other graphs of the same generator: optimality at beta = 100 per graph
seed, mean, min and wall time (is the default robust, or tuned to graph 1000?).

    python scripts/randomwalks_seeds.py --seeds 20 21 22 23 24 25 26 27 28 29 --json outputs/randomwalks_seeds.json
    python scripts/randomwalks_seeds.py --seeds 20 21 -- --max_steps 300 --tau 0.9    # with recipe overrides
    python scripts/randomwalks_seeds.py --seeds 23 27 --train_seeds 0 1               # run-to-run variance

Each (graph seed, training seed) is one run of `tokenq iql` (configs/iql_randomwalks.yaml, `--task_seed SEED
--seed TRAIN_SEED`), in this process, one after the other; outputs go to
`outputs/randomwalks_seeds/graph_SEED[_train_TRAIN_SEED]`. With several training seeds, mean and min are
over the per-graph means.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tokenq.reporting import write_json  # noqa: E402
from tokenq.scripts.iql import main as iql  # noqa: E402
from tokenq.tasks import get_task  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20, 30)))
    p.add_argument("--train_seeds", type=int, nargs="+", default=[0], help="training seeds (--seed) per graph")
    p.add_argument("--output_dir", default="outputs/randomwalks_seeds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if "--seed" in extra:
        p.error("pass training seeds as --train_seeds (before --), so that each row records its own")
    rows, skipped = [], []
    for seed in args.seeds:
        try:
            get_task("randomwalks", seed=seed)
        except ValueError as e:  # a graph where no node reaches the goal
            print(e)
            skipped.append(seed)
            continue
        for train_seed in args.train_seeds:
            suffix = "" if args.train_seeds == [0] else f"_train_{train_seed}"
            start = time.time()
            metrics = iql(["--task_seed", str(seed), "--seed", str(train_seed), "--disable_tqdm", "true",
                           "--output_dir", f"{args.output_dir}/graph_{seed}{suffix}", *extra])
            at_100 = next(r["optimality"] for r in metrics["eval"] if r["beta"] == 100)
            rows.append({"seed": seed, "train_seed": train_seed, "optimality_beta100": at_100,
                         "behavior": metrics["behavior_reward"], "wall_time_s": time.time() - start})
    per_graph = {}
    for r in rows:
        per_graph.setdefault(r["seed"], []).append(r["optimality_beta100"])
    values = [statistics.mean(v) for v in per_graph.values()]
    summary = {"runs": rows, "skipped_degenerate": skipped, "mean": statistics.mean(values), "min": min(values), "overrides": extra,
               "wall_time_s_mean": statistics.mean(r["wall_time_s"] for r in rows)}
    print("| graph seed | training seed | optimality (beta 100) | behaviour | wall time (s) |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['train_seed']} | {r['optimality_beta100']:.3f} | {r['behavior']:.3f} | {r['wall_time_s']:.0f} |")
    print(f"mean {summary['mean']:.3f}, min {summary['min']:.3f}, mean wall time {summary['wall_time_s_mean']:.0f} s")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
