"""Rollouts of a policy on a task's training prompts, scored, as training rows: `tokenq collect`.

    tokenq collect outputs/iql_arithmetic --task arithmetic --num_samples 4 --output rollouts.jsonl
    tokenq collect outputs/iql_arithmetic --task arithmetic --strategy sample --beta 4 --output guided.jsonl
    tokenq collect MODEL_OR_HUB_ID --dataset_name rows.jsonl --reward_fn reward.py:score --output more.jsonl
    accelerate launch -m tokenq collect POLICY ...          # prompts sharded across processes, one output
    tokenq collect POLICY --critic CRITIC --beta 4 --task arithmetic --output steered.jsonl   # steered by a critic
    tokenq collect POLICY --critic CRITIC --rollin true --beta 4 --task arithmetic --output rollin.jsonl   # Q♯

The policy (the first argument) is a tokenq checkpoint, decoded with any `--strategy` of `tokenq.generate`, or any
HF causal LM folder / Hub id, sampled plainly or steered by `--critic` (a tokenq checkpoint with its tokenizer);
`--rollin true` collects Q♯'s roll-in (steered) / roll-out (plain) rows instead (`tokenq.rollouts.rollin_rows`). Prompts: the built-in task's training prompts (`--task`), the
distinct prompts of your rows (`--dataset_name`, scored by `--reward_fn`), or a file (`--prompts_file`, one prompt a
line or JSON lines with `prompt`). The rows (`tokenq.rollouts.rows_of`) are written as JSON lines that every
command reads (`--dataset_name rollouts.jsonl`), with the provenance columns round / policy / strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import TrlParser

from tokenq.cli import STRATEGY_KNOBS, read_prompts_file
from tokenq.data import load_rows, load_tokenizer
from tokenq.generation import STEP_STRATEGIES, STRATEGIES, check_decoding_args
from tokenq.outputs import claim_file
from tokenq.provenance import announce_settings
from tokenq.rollouts import collect, load_critic, load_policy, process_state, text_prompts, write_rows
from tokenq.runner import builtin_configs
from tokenq.tasks import DatasetTask, get_task, load_reward_fn

@dataclass
class CollectArguments:
    """What to collect with, on which prompts, and where the rows go (decoding knobs: `tokenq.generate`'s names)."""

    policy: str | None = field(default=None, metadata={"help": "tokenq checkpoint or HF causal LM (the first argument)."})
    output: str = field(default="rollouts.jsonl", metadata={"help": "JSON lines file the rows are written to."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file (without it: refused)."})
    task: str | None = field(default=None, metadata={"help": "Built-in task: its training prompts and reward."})
    task_seed: int | None = field(default=None, metadata={"help": "The task's data seed."})
    dataset_name: str | None = field(default=None, metadata={"help": "Your rows: their distinct prompts (any data format)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name."})
    prompts_file: str | None = field(default=None, metadata={"help": "Prompts: one a line, or JSON lines with 'prompt'."})
    reward_fn: str | None = field(default=None, metadata={"help": "Your reward: FILE.py:NAME (needed without --task)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Collect on the first N distinct prompts."})
    num_samples: int = field(default=1, metadata={"help": "Completions per prompt."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Decoding budget (default: the task's; your rows' longest completion; 64)."})
    strategy: str = field(default="sample", metadata={"help": f"tokenq.generate strategy: {', '.join(STRATEGIES)}."})
    beta: float = field(default=0.0, metadata={"help": "Guidance strength (0: the policy's own sampling)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int | None = field(default=None, metadata={"help": "top-k filter (None / 0: none)."})
    top_p: float | None = field(default=None, metadata={"help": "top-p filter."})
    num_beams: int = field(default=4, metadata={"help": "beam: its width."})
    num_candidates: int = field(default=4, metadata={"help": "best_of_n / resample: N."})
    resample_temperature: float = field(default=1.0, metadata={"help": "resample: the temperature of its softmax."})
    num_continuations: int = field(default=4, metadata={"help": "step_search: K."})
    step_beam: int = field(default=1, metadata={"help": "step_search: rows kept per prompt."})
    step_tokens: int | None = field(default=None, metadata={"help": "step_search: tokens per step."})
    step_stop_strings: list[str] | None = field(default=None, metadata={"help": "step_search: step ends."})
    aggregate: str = field(default="advantage", metadata={"help": "step_search / dvts / astar / mcts: step-score aggregation."})
    c_puct: float = field(default=1.0, metadata={"help": "mcts: PUCT's exploration weight."})
    batch_size: int = field(default=64, metadata={"help": "Completions decoded together (a chunk: one seed each)."})
    seed: int = field(default=0, metadata={"help": "Chunk c is decoded with seed + c."})
    round: int = field(default=0, metadata={"help": "The provenance column `round` (tokenq iterate sets it)."})
    critic: str | None = field(
        default=None, metadata={"help": "A tokenq checkpoint (same tokenizer) whose heads steer the policy at --beta."})
    rollin: bool = field(
        default=False, metadata={"help": "With --critic: Q♯'s roll-in (the policy steered by the critic, h ~ U{0..budget-1} "
                                 "tokens) then roll-out (the policy alone); rows are prompt + roll-in -> roll-out."})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        check_decoding_args(beta=self.beta, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}),
                            num_candidates=self.num_candidates,
                            num_beams=self.num_beams, num_continuations=self.num_continuations,
                            resample_temperature=self.resample_temperature,
                            step_tokens=self.step_tokens, aggregate=self.aggregate, c_puct=self.c_puct)
        for name in ("num_samples", "max_prompts", "batch_size"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if sum(x is not None for x in (self.task, self.dataset_name, self.prompts_file)) != 1:
            raise ValueError("give the prompts by exactly one of --task NAME, --dataset_name ROWS, --prompts_file FILE")
        if self.task is None and self.reward_fn is None:
            raise ValueError("--reward_fn FILE.py:NAME scores the completions of --dataset_name / --prompts_file prompts")
        if self.rollin and (self.critic is None or self.strategy != "sample"):
            raise ValueError("--rollin true rolls in with the policy steered by --critic CHECKPOINT (--strategy sample)")

    def generate_kwargs(self) -> dict:
        """`tokenq.generate`'s arguments: the filter and the knobs of the chosen strategy (`tokenq generate`'s)."""
        knobs = {k: getattr(self, k) for k in STRATEGY_KNOBS.get(self.strategy, ()) if k not in ("reward_fn", "vote")}
        if self.strategy in STEP_STRATEGIES and not self.step_stop_strings:
            knobs["step_tokens"] = self.step_tokens or 1
        return {"strategy": self.strategy, "beta": self.beta, "temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, **knobs}

    def strategy_name(self) -> str:
        """The provenance column `strategy`: the strategy and its settings."""
        return f"{self.strategy} beta={self.beta:g} temperature={self.temperature:g} top_k={self.top_k or 0}"


def prompts_and_task(args: CollectArguments, tokenizer):
    """(task, rendered prompts, {rendered: original prompt}) for the three sources of prompts."""
    if args.task:
        task = get_task(args.task, seed=args.task_seed)
        return task, text_prompts(task.dataset())[: args.max_prompts], {}
    if args.dataset_name:
        rows = load_rows(args.dataset_name, None, args.dataset_split)
    else:
        from datasets import Dataset

        prompts = read_prompts_file(args.prompts_file)
        if not prompts:
            raise SystemExit(f"tokenq collect: --prompts_file {args.prompts_file} holds no prompt; nothing was written")
        rows = Dataset.from_list([{"prompt": p, "completion": "", "reward": 0.0} for p in prompts])
    budget = args.max_new_tokens or (None if args.dataset_name else 64)  # your rows: their longest completion
    task = DatasetTask(rows, tokenizer, load_reward_fn(args.reward_fn), name="collect", max_new_tokens=budget,
                       max_prompts=args.max_prompts)
    return task, task.eval_prompts(), task.originals()


def main(argv: list[str] | None = None) -> list[dict]:
    user_argv = list(argv or [])
    if user_argv and not user_argv[0].startswith("-"):
        user_argv = ["--policy", user_argv[0], *user_argv[1:]]
    (args,) = TrlParser((CollectArguments,), allow_abbrev=False, prog="tokenq collect POLICY").parse_args_and_config(user_argv)
    announce_settings(user_argv, user_argv, (args,), (CollectArguments,), builtin_configs())
    if not args.policy:
        raise SystemExit("tokenq collect: give the policy (a tokenq checkpoint or HF causal LM) as the first argument")
    claim_file(args.output, args.overwrite, "collect")
    tokenizer = load_tokenizer(args.policy)
    task, prompts, originals = prompts_and_task(args, tokenizer)
    if not prompts:
        raise SystemExit("tokenq collect: no prompts to collect on (--task / --dataset_name / --prompts_file gave none); "
                         "nothing was written")
    state = process_state()
    model, guided = load_policy(args.policy)
    model.to(state.device)
    critic = load_critic(args.critic, model, tokenizer) if args.critic else None
    if not guided and critic is None and (args.beta or args.strategy not in ("sample", "greedy")):
        raise SystemExit(f"tokenq collect: {args.policy} is a plain causal LM (no tokenq value heads): it can only be "
                         "sampled plainly (--strategy sample or greedy, --beta 0), or steered by --critic CHECKPOINT")
    provenance = {"round": args.round, "policy": args.policy, "strategy": args.strategy_name()}
    if args.rollin:
        provenance["strategy"] = f"rollin {args.strategy_name()} critic={args.critic}"
        how = {"outcome_rows": True, "rollin": {"critic": critic, "beta": args.beta}, "temperature": args.temperature,
               "max_new_tokens": args.max_new_tokens}
    else:
        how = {**args.generate_kwargs(), **({"critic": critic} if critic is not None else {})}
    rows, stats = collect(model, tokenizer, task, prompts, num_samples=args.num_samples, seed=args.seed,
                          batch_size=args.batch_size, provenance=provenance, originals=originals, **how)
    if not rows:
        raise SystemExit(f"tokenq collect: no rows were collected ({len(prompts)} prompts x {args.num_samples}"
                         f"{': every roll-in ended at EOS, leaving nothing to roll out' if args.rollin else ''}); "
                         f"nothing was written to {args.output}")
    if state.is_main_process:
        write_rows(rows, args.output)
        reward = sum(r["reward"] for r in rows) / len(rows)
        print(f"collected {len(rows)} rows ({len(prompts)} prompts x {args.num_samples}) with {args.policy} on "
              f"{state.num_processes} process(es): mean reward {reward:.4f}, {stats['generated_tokens']:.2f} tokens per "
              f"completion; wrote {args.output}")
    return rows
