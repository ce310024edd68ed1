"""`tokenq scale`: test-time-compute curves — every decoding strategy at each budget on a task, reward against the
tokens it generated and against wall time.

    tokenq scale outputs/value_arithmetic --task arithmetic --budgets 1 2 4 8 16      # configs/scale_arithmetic.yaml
    tokenq scale POLICY --critic CRITIC --task arithmetic --budgets 1 4 16             # a critic steering a policy
    tokenq scale CHECKPOINT --eval_dataset held.jsonl --reward_fn reward.py:score --budgets 1 4 16   # your task

A budget N is N completions' worth of compute: best_of_n / resample draw N candidates (each also with every vote of
`--votes` when the task has an `answer`), beam search keeps N beams (N >= 2), step search N continuations per step, dvts N
candidates in N / `--eval_num_continuations` subtrees (best subtree, and each vote), astar and mcts N x the task's
`max_new_tokens` tokens with `--eval_num_continuations` children per expansion; sample and greedy run at budget 1.
Step-level strategies run once per `--aggregates` entry. Proposals are the policy's own (`--beta`, default 0: the
critic only chooses). Every cell is timed alone, start to end, on the task's evaluation prompts
(`--eval_samples_per_prompt` decodes each).

Writes `DIR/scale_metrics.json` — `{"rows": [{"strategy", "budget", "vote", "aggregate", "reward", <the task's
extras>, "generated_tokens", "forward_rows", "seconds"}, ...]}` (per-prompt means; seconds for the whole cell) —
and `DIR/reward_vs_tokens.png`, `DIR/reward_vs_seconds.png`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenq.choices import check_list
from tokenq.evaluation import step_definition, sweep
from tokenq.generation import STEP_STRATEGIES, STRATEGIES, VOTING_STRATEGIES, check_decoding_args
from tokenq.reporting import plot_sweep, write_json
from tokenq.scripts.evaluate import _load, _parse
from tokenq.votes import AGGREGATES, VOTES


@dataclass
class ScaleArguments:
    """The budgets and what runs at each (the strategies: `--eval_strategies`, default every one)."""

    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={
        "help": "Budgets N (completions' worth of compute): candidates, beams, continuations per step, or N x max_new_tokens."})
    votes: list[str] = field(default_factory=lambda: list(VOTES), metadata={
        "help": f"Votes over answers ({', '.join(VOTES)}) run beside the best-score pick by best_of_n / resample / dvts "
                "(tasks with an `answer`)."})
    aggregates: list[str] = field(default_factory=lambda: ["advantage"], metadata={
        "help": f"Step-score aggregations ({', '.join(AGGREGATES)}) of the step-level strategies, one cell each."})
    beta: float = field(default=0.0, metadata={"help": "Guidance of the proposals (0: the policy's own; the critic ranks)."})
    c_puct: float = field(default=1.0, metadata={"help": "mcts: the exploration weight of PUCT."})

    def __post_init__(self) -> None:
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"--budgets must be integers >= 1, got {self.budgets}")
        check_list("--budgets", self.budgets)
        check_list("--aggregates", self.aggregates, AGGREGATES)
        if self.votes:  # none: best-score picks only
            check_list("--votes", self.votes, VOTES)
        check_decoding_args(beta=self.beta, c_puct=self.c_puct)


def cells(strategies: list[str], scale: ScaleArguments, width: int, steps: dict, can_vote: bool) -> list[dict]:
    """Every (strategy, budget, vote, aggregate) cell as `tokenq.generate` keyword arguments (plus `budget`)."""
    out = []
    for strategy in strategies:
        budgets = [1] if strategy in ("sample", "greedy") else [b for b in scale.budgets if b >= 2 or strategy != "beam"]
        for budget in budgets:  # one beam is greedy decoding
            knob = budget_knobs(strategy, budget, width)
            votes = [None, *scale.votes] if strategy in VOTING_STRATEGIES and can_vote else [None]
            aggregates = scale.aggregates if strategy in STEP_STRATEGIES else ["advantage"]
            for vote in votes:
                for aggregate in aggregates:
                    cell = {"strategy": strategy, "budget": budget, "beta": scale.beta, **knob,
                            **(steps if strategy in STEP_STRATEGIES else {}), "vote": vote, "aggregate": aggregate}
                    out.append(cell | ({"c_puct": scale.c_puct} if strategy == "mcts" else {}))
    return out


def budget_knobs(strategy: str, budget: int, width: int) -> dict:
    """The `tokenq.generate` knobs that spend budget N in `strategy`."""
    if strategy == "beam":
        return {"num_beams": budget}
    if strategy == "step_search":
        return {"num_continuations": budget}
    if strategy in ("dvts", "astar", "mcts"):
        return {"num_candidates": budget, "num_continuations": width}
    return {"num_candidates": budget} if strategy in ("best_of_n", "resample") else {}


def run_cells(model, tokenizer, task, configs: list[dict], args, seed: int, **common) -> list[dict]:
    """Each cell timed alone (`tokenq.evaluation.sweep`, one configuration at a time)."""
    rows = []
    for config in configs:
        generate_kwargs = {k: v for k, v in config.items() if k not in ("budget", "vote")}
        if config["vote"] is not None:
            generate_kwargs |= {"vote": config["vote"], "answer_fn": task.answer}
        start = time.perf_counter()
        row = sweep(model, tokenizer, task, [generate_kwargs], args.eval_samples_per_prompt, seed, **common)[0]
        seconds = time.perf_counter() - start
        extras = {k: v for k, v in row.items() if k not in generate_kwargs and k not in ("reward", "forward_passes", "value_score", "kl")}
        rows.append({"strategy": config["strategy"], "budget": config["budget"], "vote": config["vote"],
                     "aggregate": config["aggregate"], "reward": row["reward"], **extras,
                     "forward_rows": row["forward_passes"], "seconds": seconds})
        print(f"{curve_label(rows[-1]):32s} N={config['budget']:<3d} reward {row['reward']:.3f}  tokens "
              f"{row['generated_tokens']:.1f}  forward rows {row['forward_passes']:.1f}  {seconds:.1f} s", flush=True)
    return rows


def scale_table(rows: list[dict], behavior_reward: float | None) -> str:
    """Markdown: one line per cell."""
    lines = ["| strategy | N | reward | tokens / prompt | forward rows / prompt | seconds |", "|---|---:|---:|---:|---:|---:|"]
    if behavior_reward is not None:
        lines.append(f"| data (behaviour) | | {behavior_reward:.3f} | | | |")
    lines += [f"| {curve_label(r)} | {r['budget']} | {r['reward']:.3f} | {r['generated_tokens']:.1f} | {r['forward_rows']:.1f} "
              f"| {r['seconds']:.1f} |" for r in rows]
    return "\n".join(lines)


def curve_label(row: dict) -> str:
    """One curve per strategy, vote and aggregate."""
    parts = [row["strategy"]]
    parts += [f"{row['vote']} vote"] if row.get("vote") else []
    parts += [row["aggregate"]] if row.get("aggregate") not in (None, "advantage") else []
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    ckpt, args, scale = _parse(argv, "scale", extra=(ScaleArguments,))
    start = time.time()
    model, tokenizer, task, out, critic = _load(ckpt, args, "scale")
    strategies = [s for s in STRATEGIES if s in ckpt.eval_strategies]
    width = args.eval_num_continuations[0]
    can_vote = getattr(task, "answer", None) is not None
    if scale.votes and not can_vote:
        print(f"tokenq scale: task {task.name!r} has no `answer` (your data: --answer_fn FILE.py:NAME): no votes, "
              "best_of_n / resample / dvts pick the best score only")
    configs = cells(strategies, scale, width, step_definition(task, args.eval_step_tokens, args.eval_step_stop_strings),
                    can_vote)
    rows = run_cells(model, tokenizer, task, configs, args, ckpt.seed, **critic, **args.filter_kwargs())
    behaviour = task.behavior_reward()
    write_json(out / "scale_metrics.json", {"checkpoint": ckpt.checkpoint, "critic": ckpt.critic, "task": task.name,
                                            "behavior_reward": behaviour, "eval_filter": args.filter_kwargs(),
                                            "eval_samples_per_prompt": args.eval_samples_per_prompt, "rows": rows,
                                            "wall_time_s": time.time() - start})
    plotted = [{**r, "curve": curve_label(r)} for r in rows]
    plot_sweep(plotted, "generated_tokens", out / "reward_vs_tokens.png", "generated tokens per prompt", behaviour,
               curve="curve", log_x=True)
    plot_sweep(plotted, "seconds", out / "reward_vs_seconds.png", "seconds (all evaluation prompts)", behaviour,
               curve="curve", log_x=True)
    print(scale_table(rows, behaviour))
    print(f"wrote {out}/scale_metrics.json, reward_vs_tokens.png, reward_vs_seconds.png")
    return rows


if __name__ == "__main__":
    main()
