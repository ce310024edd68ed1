"""tokenq: token-level value functions for Hugging Face causal LMs, and Q-guided decoding.

usage: tokenq COMMAND [ARGS]

training (the recipes' own dataclasses and parser; `tokenq iql --help` lists every field):
  tokenq iql   [--config FILE_OR_NAME] [--field value ...]   ILQL / IQL (default config: randomwalks)
  tokenq value [--config FILE_OR_NAME] [--field value ...]   Monte-Carlo values / Q-probes (arithmetic)
  tokenq dqo   [--config FILE_OR_NAME] [--field value ...]   DQO (arithmetic_full)

decoding and evaluation:
  tokenq generate CHECKPOINT --prompt TEXT [--prompt TEXT ...] [--prompts_file FILE] [--strategy ...]
                  guided decoding from a checkpoint folder or Hub id: a table of completions, value scores
                  and compute
  tokenq eval     CHECKPOINT [--task randomwalks] [--betas 0 1 4 16 100]
                  a built-in task's metrics for a checkpoint (guided sampling at each beta)
  tokenq sweep    --checkpoint CHECKPOINT [...]   every decoding strategy on a task: reward vs KL and compute

sharing:
  tokenq push DIR REPO_ID [--private] [--token TOKEN]   upload a checkpoint folder to the Hugging Face Hub

  tokenq configs                                       list the built-in configs (`--config NAME`)

Several processes: `accelerate launch [--config_file configs/accelerate/...] -m tokenq iql ...`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

TRAINING = {"iql": "tokenq.scripts.iql", "value": "tokenq.scripts.value", "dqo": "tokenq.scripts.dqo",
            "sweep": "tokenq.scripts.sweep"}
_STRATEGY_KNOBS = {"beam": ("num_beams",), "best_of_n": ("num_candidates",), "resample": ("num_candidates",),
                   "step_search": ("num_continuations", "step_tokens", "step_stop_strings")}


def _load(checkpoint: str):
    from tokenq.data import load_tokenizer
    from tokenq.modeling import TokenQModel

    return TokenQModel.from_pretrained(checkpoint), load_tokenizer(checkpoint)  # the tokenizer is saved beside the weights


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        for line in Path(args.prompts_file).read_text().splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    if not prompts:
        raise SystemExit("tokenq generate: give prompts with --prompt TEXT or --prompts_file FILE")
    return prompts


def generate_command(argv: list[str]) -> list[dict]:
    from tokenq.evaluation import complete
    from tokenq.reporting import write_json
    from tokenq.generation import STRATEGIES

    p = argparse.ArgumentParser(prog="tokenq generate", description="Guided decoding from a tokenq checkpoint.",
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--strategy", choices=STRATEGIES, default="sample")
    p.add_argument("--beta", type=float, default=1.0, help="guidance strength (0 = the base LM)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--num_candidates", type=int, default=8)
    p.add_argument("--num_continuations", type=int, default=4)
    p.add_argument("--step_tokens", type=int, default=None)
    p.add_argument("--step_stop_strings", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    from transformers import set_seed

    model, tokenizer = _load(args.checkpoint)
    prompts = _read_prompts(args)
    set_seed(args.seed)
    knobs = {k: getattr(args, k) for k in _STRATEGY_KNOBS.get(args.strategy, ())}
    if args.strategy == "step_search" and not args.step_stop_strings:
        knobs.setdefault("step_tokens", args.step_tokens or 1)
    completions, stats = complete(model, tokenizer, prompts, args.max_new_tokens, strategy=args.strategy, beta=args.beta,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, **knobs)
    rows = [{"prompt": p_, "completion": c, "value_score": float(s), "generated_tokens": int(t), "forward_rows": int(f)}
            for p_, c, s, t, f in zip(prompts, completions, stats["scores"], stats["generated_tokens"], stats["forward_passes"])]
    print("| # | prompt | completion | value score | tokens | forward rows |\n|---:|---|---|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['prompt']!r} | {r['completion']!r} | {r['value_score']:.3f} | {r['generated_tokens']} | {r['forward_rows']} |")
    if args.json:
        write_json(args.json, rows)
    return rows


def eval_command(argv: list[str]) -> list[dict]:
    from tokenq.evaluation import behaviour_metrics, sweep
    from tokenq.reporting import sweep_table, write_json
    from tokenq.tasks import get_task

    p = argparse.ArgumentParser(prog="tokenq eval", description="A built-in task's metrics for a checkpoint.",
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    p.add_argument("--task", default="randomwalks")
    p.add_argument("--task_seed", type=int, default=None)
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0, 4.0, 16.0, 100.0])
    p.add_argument("--samples_per_prompt", type=int, default=10)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the metrics to this file")
    args = p.parse_args(argv)
    model, tokenizer = _load(args.checkpoint)
    task = get_task(args.task, seed=args.task_seed)
    rows = sweep(model, tokenizer, task, [{"strategy": "sample", "beta": b} for b in args.betas],
                 args.samples_per_prompt, args.seed, top_k=args.top_k)
    behaviour = float(behaviour_metrics(task)["behavior_optimality"])
    print(f"task {task.name}: reward of the behaviour data {behaviour:.3f}")
    print(sweep_table(rows))
    if args.json:
        write_json(args.json, {"task": task.name, "behavior_reward": behaviour, "rows": rows})
    return rows


def push_command(argv: list[str]):
    from huggingface_hub import HfApi

    from tokenq.checkpoint import ADAPTER_FILE, CONFIG_FILE, HEADS_FILE, read_config

    p = argparse.ArgumentParser(prog="tokenq push", description="Upload a tokenq checkpoint folder to the Hub.",
                                allow_abbrev=False)
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--commit_message", default="Upload tokenq checkpoint")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    record = read_config(folder)["backbone"]  # refuses a folder that is not a tokenq checkpoint
    needed = [CONFIG_FILE, HEADS_FILE]
    needed += ["adapter_config.json", ADAPTER_FILE] if record["mode"] == "lora" else []
    needed += ["config.json"] if record["mode"] != "lora" and record["base_model"] is None else []
    missing = [f for f in needed if not (folder / f).exists()]
    if "config.json" in needed and not list(folder.glob("model*.safetensors")):
        missing.append("model*.safetensors")
    if missing:
        raise SystemExit(f"tokenq push: {folder} is missing {missing}: not a complete tokenq checkpoint")
    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=args.commit_message,
                               ignore_patterns=["checkpoint-*", "_*", ".*"])  # not Trainer's resume checkpoints
    print(f"pushed {folder} to {repo_id}")
    return commit


def configs_command(argv: list[str]) -> None:
    from tokenq.runner import builtin_configs

    for path in sorted(builtin_configs().glob("*.yaml")):
        print(f"{path.stem:28s} {path.read_text().splitlines()[0].lstrip('# ')}")


COMMANDS = {"generate": generate_command, "eval": eval_command, "push": push_command, "configs": configs_command}


def main(argv: list[str] | None = None) -> None:
    """The console script (its return value would become the exit status)."""
    run(argv)


def run(argv: list[str] | None = None):
    """Run one command; returns what it returns (metrics, rows, the commit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return None
    command, rest = argv[0], argv[1:]
    if command in TRAINING:
        return importlib.import_module(TRAINING[command]).main(rest)
    if command in COMMANDS:
        return COMMANDS[command](rest)
    raise SystemExit(f"tokenq: unknown command {command!r} (commands: {', '.join([*TRAINING, *COMMANDS])}; see tokenq --help)")


if __name__ == "__main__":
    main()
