"""Sweep Q-guided decoding strategies on a tokenq checkpoint: reward against KL and against compute.

    tokenq sweep --checkpoint outputs/iql_randomwalks          # or: python recipes/generate.py ...
    tokenq sweep --config generate_randomwalks --checkpoint someone/tokenq-model

Writes `generate_metrics.json`, `reward_vs_kl.png` and `reward_vs_compute.png` to `--output_dir`
(default: the checkpoint folder when it is local) and prints the table.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer
from trl import TrlParser

from tokenq import TokenQModel
from tokenq.evaluation import behaviour_metrics, sweep
from tokenq.reporting import plot_sweep, sweep_table, write_json
from tokenq.runner import with_config
from tokenq.tasks import get_task


@dataclass
class GenerateArguments:
    """What to decode, and the grid of strategies and knobs to sweep."""

    checkpoint: str = field(default="outputs/iql_randomwalks", metadata={"help": "tokenq checkpoint: local folder or Hub id."})
    task: str = field(default="randomwalks", metadata={"help": "Built-in task whose evaluation prompts and reward are used."})
    task_seed: int | None = field(default=None, metadata={"help": "The task's data seed (randomwalks: graph_seed)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write results (default: the checkpoint folder)."})
    samples_per_prompt: int = field(default=20, metadata={"help": "Decodes per evaluation prompt and configuration."})
    seed: int = field(default=0, metadata={"help": "Seed set before every configuration."})
    top_k: int | None = field(default=10, metadata={"help": "pi_beta's top-k filter (all strategies)."})
    top_p: float | None = field(default=None, metadata={"help": "pi_beta's top-p filter (all strategies)."})
    temperature: float = field(default=1.0, metadata={"help": "pi_beta's temperature (all strategies)."})
    sample_betas: list[float] = field(default_factory=lambda: [0, 1, 4, 16, 100], metadata={"help": "Guided sampling."})
    greedy_betas: list[float] = field(default_factory=lambda: [0, 100], metadata={"help": "Guided greedy decoding."})
    beam_sizes: list[int] = field(default_factory=lambda: [4], metadata={"help": "Guided beam search widths."})
    beam_betas: list[float] = field(default_factory=lambda: [0, 16], metadata={"help": "Betas for beam search."})
    best_of_n: list[int] = field(default_factory=lambda: [2, 4, 8, 16], metadata={"help": "N of best-of-N (plain candidates)."})
    resample_n: list[int] = field(default_factory=lambda: [4, 16], metadata={"help": "N of softmax resampling."})
    resample_temperature: float = field(default=0.05, metadata={"help": "Temperature of the resampling softmax."})
    step_k: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "K continuations per step (step search)."})
    step_tokens: int | None = field(default=1, metadata={"help": "Step size in tokens (randomwalks: one node)."})
    step_stop_strings: list[str] | None = field(default=None, metadata={"help": "Step boundaries, e.g. ';' (instead of step_tokens)."})


def configurations(args: GenerateArguments) -> list[dict]:
    """The sweep grid as `tokenq.generate` keyword arguments."""
    step = {"step_tokens": args.step_tokens} if args.step_tokens else {"step_stop_strings": args.step_stop_strings}
    return (
        [{"strategy": "sample", "beta": b} for b in args.sample_betas]
        + [{"strategy": "greedy", "beta": b} for b in args.greedy_betas]
        + [{"strategy": "beam", "num_beams": w, "beta": b} for w in args.beam_sizes for b in args.beam_betas]
        + [{"strategy": "best_of_n", "num_candidates": n, "beta": 0.0} for n in args.best_of_n]
        + [{"strategy": "resample", "num_candidates": n, "beta": 0.0, "resample_temperature": args.resample_temperature} for n in args.resample_n]
        + [{"strategy": "step_search", "num_continuations": k, "beta": 0.0, **step} for k in args.step_k]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = with_config(argv, "generate", "randomwalks")
    (args,) = TrlParser((GenerateArguments,), allow_abbrev=False).parse_args_and_config(argv)
    start = time.time()
    model = TokenQModel.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)  # saved beside the weights (folder or Hub repo)
    task = get_task(args.task, seed=args.task_seed)
    filters = {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    rows = sweep(model, tokenizer, task, configurations(args), args.samples_per_prompt, args.seed, **filters)
    behaviour = behaviour_metrics(task)["behavior_optimality"]

    out = Path(args.output_dir or (args.checkpoint if Path(args.checkpoint).is_dir() else "outputs/generate"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "generate_metrics.json", {"checkpoint": args.checkpoint, "task": task.name, "filter": filters,
                                               "samples_per_prompt": args.samples_per_prompt, "behavior_reward": behaviour,
                                               "sweep": rows, "wall_time_s": time.time() - start})
    plot_sweep(rows, "kl", out / "reward_vs_kl.png", "KL(pi_guided || pi_beta), nats per sequence", behaviour)
    plot_sweep(rows, "generated_tokens", out / "reward_vs_compute.png", "generated tokens per prompt", behaviour)
    print(sweep_table(rows))
    print(f"wrote {out}/generate_metrics.json, reward_vs_kl.png, reward_vs_compute.png")
    return rows


if __name__ == "__main__":
    main()
