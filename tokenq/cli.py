"""tokenq: token-level value functions for Hugging Face causal LMs, and Q-guided decoding.

usage: tokenq COMMAND [ARGS]

training (the recipes' own dataclasses and parser; `tokenq iql --help` lists every field):
  tokenq iql   [--config FILE_OR_NAME] [--field value ...]   ILQL / IQL
  tokenq value [--config FILE_OR_NAME] [--field value ...]   Monte-Carlo values / Q-probes; with --policy MODEL a
               critic for that frozen policy, on its own rollouts (--config arithmetic_critic)
  tokenq dqo   [--config FILE_OR_NAME] [--field value ...]   DQO
  tokenq tune  --model_name_or_path M --dataset_name D --eval_dataset E [--reward_fn F] --output_dir DIR
               [--n_trials 20] [--timeout S]   ILQL settings for your task (DIR/best.yaml for tokenq iql --config)
  Built-in tasks: --task randomwalks | arithmetic. Your task: --model_name_or_path MODEL --dataset_name ROWS
  [--eval_dataset HELD | --eval_split FRACTION] [--reward_fn FILE.py:NAME]; without --config each command
  runs its config for your data (configs/*_dataset.yaml) or for the task.

decoding and evaluation (CHECKPOINT: a folder or a Hub id):
  tokenq generate CHECKPOINT --prompt TEXT [--prompt TEXT ...] [--prompts_file FILE] [--strategy ...]
                  guided decoding: a table of completions, value scores and compute
  tokenq generate POLICY --critic CHECKPOINT [--eta E] ...
                  any HF causal LM steered by a tokenq critic with the same tokenizer (eval / sweep take --critic too)
  tokenq eval     CHECKPOINT (--task NAME | --eval_dataset FILE --reward_fn FILE.py:NAME) [--eval_betas ...]
                  the task's reward (and named extras) of guided sampling at each beta
  tokenq sweep    CHECKPOINT (--task NAME | --eval_dataset FILE --reward_fn FILE.py:NAME) [...]
                  every decoding strategy on the task: reward vs KL and compute
  tokenq scale    CHECKPOINT (--task NAME | --eval_dataset FILE --reward_fn FILE.py:NAME) --budgets 1 2 4 8 16 [...]
                  test-time-compute curves: every strategy (A*, MCTS, DVTS, votes, ...) at each budget, reward
                  against generated tokens and against seconds

closing the loop:
  tokenq collect  POLICY (--task NAME | --dataset_name ROWS | --prompts_file FILE) [--reward_fn ...] --output FILE
                  rollouts of a policy (tokenq checkpoint, any strategy; or an HF causal LM), scored, as training rows
  tokenq extract  CRITIC --method awr|best_of_n|dpo [--task NAME | --dataset_name ROWS ...] [--output_dir DIR]
                  a plain HF causal LM extracted from a trained critic (DIR/policy)
  tokenq iterate  [--config arithmetic_loop | randomwalks_loop] [--rounds R]
                  rounds of train Q -> extract -> collect -> retrain; resumes at the round it was stopped in

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
            "eval": "tokenq.scripts.evaluate:eval_main", "sweep": "tokenq.scripts.evaluate:sweep_main", "scale": "tokenq.scripts.scale",
            "tune": "tokenq.scripts.tune", "collect": "tokenq.scripts.collect", "extract": "tokenq.scripts.extract", "iterate": "tokenq.scripts.iterate"}
STEPS = ("num_continuations", "step_tokens", "step_stop_strings", "aggregate")
STRATEGY_KNOBS = {"beam": ("num_beams",), "best_of_n": ("num_candidates", "reward_fn", "vote"),
                  "resample": ("num_candidates", "reward_fn", "resample_temperature", "vote"),
                  "step_search": (*STEPS, "step_beam"), "dvts": ("num_candidates", *STEPS, "vote"),
                  "astar": ("num_candidates", *STEPS), "mcts": ("num_candidates", *STEPS, "c_puct")}


def load_steering(checkpoint: str, critic: str | None = None):
    """(model, tokenizer, critic) for the decoding commands: a tokenq checkpoint (its heads steer its LM), or with
    `critic` any causal LM (or tokenq checkpoint) as the policy and the critic checkpoint's heads steering it."""
    from tokenq.data import load_tokenizer
    from tokenq.modeling import TokenQModel
    from tokenq.rollouts import load_critic, load_policy

    tokenizer = load_tokenizer(checkpoint)  # saved beside the weights
    if critic is None:
        return TokenQModel.from_pretrained(checkpoint), tokenizer, None
    model, _ = load_policy(checkpoint)
    return model, tokenizer, load_critic(critic, model, tokenizer)


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one a line, or JSON lines with a 'prompt' field; errors name the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--prompts_file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts_file {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line)
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--prompts_file {path}, line {number}: a JSON line needs a 'prompt' field ({e!r})") from None
        if not isinstance(prompt, str):
            raise ValueError(f"--prompts_file {path}, line {number}: 'prompt' must be a string, got {type(prompt).__name__}")
        prompts.append(prompt)
    return prompts


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise SystemExit("tokenq generate: give prompts with --prompt TEXT or --prompts_file FILE")
    return prompts


def _eval_default(name: str):
    """The default of `EvalArguments.eval_<name>` (its first value for a grid): every command shares it."""
    from dataclasses import MISSING, fields

    from tokenq.data import EvalArguments

    f = next(f for f in fields(EvalArguments) if f.name == f"eval_{name}")
    value = f.default if f.default is not MISSING else f.default_factory()
    return value[0] if isinstance(value, list) else value


def generate_command(argv: list[str]) -> list[dict]:
    from tokenq.evaluation import complete
    from tokenq.generation import STEP_STRATEGIES, STRATEGIES
    from tokenq.reporting import write_json
    from tokenq.tasks import load_function, load_reward_fn
    from tokenq.votes import AGGREGATES, VOTES

    p = argparse.ArgumentParser(prog="tokenq generate", description="Guided decoding from a tokenq checkpoint; "
                                "every knob is tokenq.generate's (defaults: those of tokenq eval / sweep).", allow_abbrev=False)
    p.add_argument("checkpoint", help="checkpoint folder or Hub repo id (with --critic: any causal LM, the policy)")
    p.add_argument("--critic", default=None, help="a tokenq checkpoint with the same tokenizer that steers the policy")
    p.add_argument("--eta", type=float, default=None, help="read a distributional critic as Q_eta (beta = 1/eta)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--strategy", choices=STRATEGIES, default="sample")
    p.add_argument("--beta", type=float, default=None, help="guidance strength (default 1; 0 = the base LM)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=_eval_default("temperature"),
                   help="pi_beta's temperature (> 0; greedy decoding is --strategy greedy)")
    p.add_argument("--top_k", type=int, default=_eval_default("top_k"), help="pi_beta's top-k (0: none)")
    p.add_argument("--top_p", type=float, default=_eval_default("top_p"))
    p.add_argument("--num_beams", type=int, default=_eval_default("num_beams"))
    p.add_argument("--num_candidates", type=int, default=_eval_default("num_candidates"))
    p.add_argument("--num_continuations", type=int, default=_eval_default("num_continuations"))
    p.add_argument("--step_tokens", type=int, default=_eval_default("step_tokens"))
    p.add_argument("--step_stop_strings", nargs="*", default=_eval_default("step_stop_strings"))
    p.add_argument("--step_beam", type=int, default=1)
    p.add_argument("--resample_temperature", type=float, default=_eval_default("resample_temperature"))
    p.add_argument("--reward_fn", default=None, help="best_of_n / resample: rank candidates by FILE.py:NAME instead of the value")
    p.add_argument("--aggregate", choices=AGGREGATES, default="advantage", help="step_search / dvts / astar / mcts: how "
                   "a path's step scores are combined (tokenq.votes)")
    p.add_argument("--vote", choices=VOTES, default=None, help="best_of_n / resample / dvts: vote over the candidates' "
                   "answers (needs --answer_fn)")
    p.add_argument("--answer_fn", default=None, help="a completion's final answer, for --vote: FILE.py:NAME")
    p.add_argument("--c_puct", type=float, default=1.0, help="mcts: PUCT's exploration weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    from transformers import set_seed

    from tokenq.generation import guidance_weight, check_decoding_args

    check_decoding_args(beta=guidance_weight(args.beta, args.eta), max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                        num_candidates=args.num_candidates,
                        num_continuations=args.num_continuations, step_tokens=args.step_tokens, step_beam=args.step_beam,
                        resample_temperature=args.resample_temperature, aggregate=args.aggregate, vote=args.vote,
                        c_puct=args.c_puct)  # before the checkpoint is loaded
    if args.vote and not args.answer_fn:
        raise SystemExit("tokenq generate: --vote needs --answer_fn FILE.py:NAME (a completion's final answer)")
    model, tokenizer, critic = load_steering(args.checkpoint, args.critic)
    prompts = _read_prompts(args)
    set_seed(args.seed)
    knobs = {k: getattr(args, k) for k in STRATEGY_KNOBS.get(args.strategy, ())}
    if args.strategy in STEP_STRATEGIES and not args.step_stop_strings:
        knobs["step_tokens"] = args.step_tokens or 1
    if knobs.get("reward_fn"):
        knobs["reward_fn"] = load_reward_fn(args.reward_fn)
    if knobs.get("vote"):
        knobs["answer_fn"] = load_function(args.answer_fn, "--answer_fn")
    completions, stats = complete(model, tokenizer, prompts, args.max_new_tokens, strategy=args.strategy, beta=args.beta,
                                  critic=critic, eta=args.eta, temperature=args.temperature, top_k=args.top_k or None,
                                  top_p=args.top_p, **knobs)
    score = "reward" if knobs.get("reward_fn") else "value_score"  # what ranked the candidates
    rows = [{"prompt": p_, "completion": c, score: float(s), "generated_tokens": int(t), "forward_rows": int(f)}
            for p_, c, s, t, f in zip(prompts, completions, stats["scores"], stats["generated_tokens"], stats["forward_passes"])]
    print(f"| # | prompt | completion | {score.replace('_', ' ')} | tokens | forward rows |\n|---:|---|---|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['prompt']!r} | {r['completion']!r} | {r[score]:.3f} | {r['generated_tokens']} | {r['forward_rows']} |")
    if args.json:
        write_json(args.json, rows)
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


COMMANDS = {"generate": generate_command, "push": push_command, "configs": configs_command}


def main(argv: list[str] | None = None) -> None:
    """The console script (its return value would become the exit status). SIGTERM, like Ctrl-C, stops a command
    with every clean-up run (no partial checkpoint or output is left): exit status 143 (SIGTERM) / 130 (SIGINT)."""
    from tokenq.atomic import Interrupted, interrupts_raise
    from tokenq.data import NotFound

    try:
        with interrupts_raise():
            run(argv)
    except NotFound as e:  # a model name that is nowhere: one line, not the Hub client's traceback
        raise SystemExit(f"tokenq: {e}") from None
    except KeyboardInterrupt as e:
        print(f"tokenq: {str(e) or 'stopped by SIGINT'}", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Interrupted) else 130) from None


def run(argv: list[str] | None = None):
    """Run one command; returns what it returns (metrics, rows, the commit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return None
    command, rest = argv[0], argv[1:]
    if command in TRAINING:
        module, _, function = TRAINING[command].partition(":")
        return getattr(importlib.import_module(module), function or "main")(rest)
    if command in COMMANDS:
        return COMMANDS[command](rest)
    raise SystemExit(f"tokenq: unknown command {command!r} (commands: {', '.join([*TRAINING, *COMMANDS])}; see tokenq --help)")


if __name__ == "__main__":
    main()
