"""Evaluate a tokenq checkpoint on a task: `tokenq eval` (guided sampling at each beta) and `tokenq sweep` (every
decoding strategy: reward against KL and against compute).

    tokenq eval  outputs/iql_randomwalks --task randomwalks --eval_betas 0 4 16 100
    tokenq sweep outputs/iql_randomwalks --task randomwalks        # configs/sweep_randomwalks.yaml
    tokenq sweep CHECKPOINT --eval_dataset held.jsonl --reward_fn reward.py:score     # your task
    tokenq eval  POLICY --critic CRITIC --task arithmetic --eval_etas 0.05 0.1 0.3 1     # a critic steering a policy

The checkpoint is a folder or a Hub id (the first argument); with `--critic CHECKPOINT` it is the policy (any causal
LM with the critic's tokenizer) and the critic's heads steer it. `--eval_etas` reads a distributional critic as Q♯'s
`Q_eta` at each eta (guided sampling with beta = 1 / eta: reward against KL without retraining). The task is a built-in `--task`, or your held-out
rows (`--eval_dataset`, or `--dataset_name` with `--eval_split`) with `--reward_fn`; the decoding knobs are
`tokenq.EvalArguments`' (the training recipes take the same). `--config` takes a YAML file or a built-in
name; `--task TASK` alone runs `configs/sweep_TASK.yaml` when there is one. Writes `eval_metrics.json` /
`sweep_metrics.json` (and the sweep's `reward_vs_kl.png`, `reward_vs_compute.png`) to `--output_dir`
(default: the checkpoint folder when it is local) and prints the table.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from tokenq.cli import load_steering
from tokenq.choices import check_list
from tokenq.data import EvalArguments, load_task
from tokenq.evaluation import beta_configs, can_score, eta_configs, search_configs, step_definition, sweep
from tokenq.diagnostics import dataset_diagnostics
from tokenq.generation import STRATEGIES
from tokenq.mdp import TokenCollator, tokenize_dataset
from tokenq.modeling import TokenQModel
from tokenq.reporting import plot_sweep, results_table, write_json
from tokenq.provenance import announce_settings
from tokenq.runner import builtin_configs, with_config
from tokenq.verdict import behaviour_of, verdict


@dataclass
class CheckpointArguments:
    """The checkpoint to evaluate, where results go, and (sweep) which strategies."""

    checkpoint: str | None = field(
        default=None, metadata={"help": "tokenq checkpoint: local folder or Hub id (the first argument); with --critic, "
                                "the policy (any causal LM)."})
    critic: str | None = field(
        default=None, metadata={"help": "A tokenq checkpoint (same tokenizer) whose heads steer the policy."})

    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write results (default: the checkpoint folder)."})
    seed: int = field(default=0, metadata={"help": "Seed set before every configuration."})
    eval_strategies: list[str] = field(
        default_factory=lambda: list(STRATEGIES), metadata={"help": "Strategies `tokenq sweep` / `tokenq scale` run."})

    def __post_init__(self) -> None:
        check_list("--eval_strategies", self.eval_strategies, STRATEGIES)


def configurations(args: EvalArguments, strategies: list[str], task=None) -> list[dict]:
    """The sweep grid as `tokenq.generate` keyword arguments: sampling and greedy at every beta, beam search at
    every width and beta; best-of-N, resampling (each N) and step search (each K; steps as `--eval_step_*` say,
    else as the task's `step_stop_strings`), dvts, astar and mcts (each N) rank plain candidates (beta 0) by the value
    score."""
    search = search_configs(task, args.eval_num_continuations, args.eval_num_candidates, args.eval_step_tokens,
                            args.eval_step_stop_strings)
    grid = {
        "sample": beta_configs(args.eval_betas),
        "greedy": [{"strategy": "greedy", "beta": b} for b in args.eval_betas],
        "beam": [{"strategy": "beam", "num_beams": w, "beta": b} for w in args.eval_num_beams for b in args.eval_betas],
        "best_of_n": [c for c in search if c["strategy"] == "best_of_n"],
        "resample": [{**c, "strategy": "resample", "resample_temperature": args.eval_resample_temperature}
                     for c in search if c["strategy"] == "best_of_n"],
        "step_search": [c for c in search if c["strategy"] == "step_search"],
    }
    step = step_definition(task, args.eval_step_tokens, args.eval_step_stop_strings)
    for tree in ("dvts", "astar", "mcts"):  # budgets of N candidates, K = the first --eval_num_continuations per expansion
        grid[tree] = [{"strategy": tree, "num_candidates": n, "num_continuations": args.eval_num_continuations[0], "beta": 0.0,
                       **step} for n in args.eval_num_candidates]
    grid["sample"] += eta_configs(args)
    unknown = sorted(set(strategies) - set(grid))
    if unknown:
        raise ValueError(f"--eval_strategies: unknown {unknown}; strategies: {list(grid)}")
    return [c for s in strategies for c in grid[s]]


def _parse(argv: list[str] | None, command: str, extra: tuple[type, ...] = ()):
    """The commands' arguments (`CheckpointArguments`, `EvalArguments`, then the command's `extra` dataclasses): the
    checkpoint as the first argument, `--config` resolved (sweep and scale: `configs/{command}_TASK.yaml` for `--task
    TASK` alone, when there is one)."""
    user_argv = list(argv or [])
    if user_argv and not user_argv[0].startswith("-"):
        user_argv = ["--checkpoint", user_argv[0], *user_argv[1:]]
    argv = with_config(user_argv, command, None) if command in ("sweep", "scale") else user_argv
    classes = (CheckpointArguments, EvalArguments, *extra)
    parser = TrlParser(classes, allow_abbrev=False, prog=f"tokenq {command} CHECKPOINT")
    parsed = parser.parse_args_and_config(argv)
    announce_settings(user_argv, argv, parsed, classes, builtin_configs())
    if not parsed[0].checkpoint:
        raise SystemExit(f"tokenq {command}: give the checkpoint (a folder or Hub id) as the first argument")
    return parsed


def _load(ckpt: CheckpointArguments, args: EvalArguments, command: str):
    """The model, its tokenizer (saved beside the weights), the task, and where results go."""
    model, tokenizer, critic = load_steering(ckpt.checkpoint, ckpt.critic)
    task, _ = load_task(args, tokenizer)
    if not can_score(task):
        raise SystemExit(f"tokenq {command}: name the task: --task NAME (built-in), or your held-out rows (--eval_dataset "
                         "FILE, or --dataset_name FILE --eval_split FRACTION) with --reward_fn FILE.py:NAME")
    out = Path(ckpt.output_dir or (ckpt.checkpoint if Path(ckpt.checkpoint).is_dir() else f"outputs/{command}"))
    out.mkdir(parents=True, exist_ok=True)
    return model, tokenizer, task, out, {"critic": critic} if critic is not None else {}


def held_out_diagnostics(values: TokenQModel, tokenizer, task) -> dict | None:
    """The value diagnostics of the heads that steer (`values`) on the task's held-out rows (`eval_dataset()`), when it
    has some. Returns are read undiscounted and unnormalised: the verdict's rank tests do not depend on the units."""
    if not hasattr(task, "eval_dataset"):
        return None
    rows = tokenize_dataset(task.eval_dataset(), tokenizer, warn_cut=False)
    return dataset_diagnostics(values, rows, TokenCollator(tokenizer.pad_token_id), gamma=1.0)


def _report(out: Path, name: str, ckpt: CheckpointArguments, args: EvalArguments, task, rows: list[dict],
            start: float, values: TokenQModel, tokenizer) -> float | None:
    """`out/name` (the rows, the verdict and what produced them) and the table, printed, the verdict first; returns
    the behaviour reward (computed once: for rows without rewards it calls the reward function)."""
    behaviour, per_prompt = behaviour_of(task)
    said = verdict(held_out_diagnostics(values, tokenizer, task), rows, behaviour, per_prompt)
    write_json(out / name, {"verdict": said, "checkpoint": ckpt.checkpoint, "critic": ckpt.critic, "task": task.name,
                            "behavior_reward": behaviour, "eval_filter": args.filter_kwargs(),
                            "eval_samples_per_prompt": args.eval_samples_per_prompt, "eval": rows,
                            "wall_time_s": time.time() - start})
    print(f"verdict: {said['message']}\ntask {task.name}:\n{results_table(rows, behaviour)}\nwrote {out / name}")
    return behaviour


def eval_main(argv: list[str] | None = None) -> list[dict]:
    ckpt, args = _parse(argv, "eval")
    start = time.time()
    model, tokenizer, task, out, critic = _load(ckpt, args, "eval")
    configs = eta_configs(args) or beta_configs(args.eval_betas)
    rows = sweep(model, tokenizer, task, configs, args.eval_samples_per_prompt, ckpt.seed, **critic, **args.filter_kwargs())
    _report(out, "eval_metrics.json", ckpt, args, task, rows, start, critic.get("critic", model), tokenizer)
    return rows


def sweep_main(argv: list[str] | None = None) -> list[dict]:
    ckpt, args = _parse(argv, "sweep")
    start = time.time()
    model, tokenizer, task, out, critic = _load(ckpt, args, "sweep")
    rows = sweep(model, tokenizer, task, configurations(args, ckpt.eval_strategies, task), args.eval_samples_per_prompt,
                 ckpt.seed, **critic, **args.filter_kwargs())
    behaviour = _report(out, "sweep_metrics.json", ckpt, args, task, rows, start, critic.get("critic", model), tokenizer)
    plot_sweep(rows, "kl", out / "reward_vs_kl.png", "KL(pi_guided || pi_beta), nats per sequence", behaviour)
    plot_sweep(rows, "generated_tokens", out / "reward_vs_compute.png", "generated tokens per prompt", behaviour)
    print(f"and {out}/reward_vs_kl.png, reward_vs_compute.png")
    return rows


if __name__ == "__main__":
    sweep_main()
