"""Every method on the same behaviour data, scored by held-out accuracy: BC, ILQL, Monte-Carlo values with
step search / best-of-N, DQO, DPO (trl) and beam search on DPO's implicit Q.

    python recipes/compare.py --task arithmetic --output_dir outputs/compare_arithmetic
    python recipes/compare.py --config configs/compare_arithmetic.yaml

Writes `compare_metrics.json` (accuracies in [0, 1]; tokens generated per prompt for the searches) and
`compare_table.md` (the README's table, with the targets met or not) and prints the table.
"""

import sys
from pathlib import Path

from trl import TrlParser

from tokenq.atomic import replace_file
from tokenq.comparison import CompareArguments, run_comparison
from tokenq.reporting import write_json
from tokenq.runner import builtin_config

DEFAULT_CONFIG = builtin_config("compare_arithmetic.yaml")
KEYS = ["behavior_data", "bc", "ilql_guided", "mc_step_search", "mc_best_of_n", "dqo", "dpo", "dpo_implicit_beam"]


def targets(m: dict) -> list[tuple[str, bool]]:
    return [
        ("mc_step_search >= behavior_data + 0.40", m["mc_step_search"] >= m["behavior_data"] + 0.40),
        ("dqo >= behavior_data + 0.20", m["dqo"] >= m["behavior_data"] + 0.20),
        ("dqo >= dpo", m["dqo"] >= m["dpo"]),
        ("mc_step_search >= mc_best_of_n at no more tokens",
         m["mc_step_search"] >= m["mc_best_of_n"] and m["step_search_tokens"] <= m["best_of_n_tokens"]),
    ]


def markdown_table(m: dict) -> str:
    """The README's table: held-out accuracy per method, the search budgets and the targets."""
    lines = ["| method | held-out accuracy |", "|---|---:|", *(f"| `{k}` | {m[k]:.3f} |" for k in KEYS), "",
             f"Generated tokens per prompt: step search {m['step_search_tokens']:.3f}, "
             f"best-of-N {m['best_of_n_tokens']:.3f}.", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: `{name}`" for name, ok in targets(m)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    (args,) = TrlParser((CompareArguments,)).parse_args_and_config(argv)
    metrics = run_comparison(args)
    metrics["targets"] = {name: ok for name, ok in targets(metrics)}
    write_json(Path(args.output_dir) / "compare_metrics.json", metrics)
    table = markdown_table(metrics)
    replace_file(Path(args.output_dir) / "compare_table.md", lambda tmp: tmp.write_text(table))
    print(table + f"wall time {metrics['wall_time_s']:.0f}s; wrote {args.output_dir}/compare_metrics.json")
    return metrics


if __name__ == "__main__":
    main()
