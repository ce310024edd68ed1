"""A critic for a given policy: a small value model trained on the frozen policy's own rollouts, then steering it.

`tokenq value --config arithmetic_critic` (or `tokenq value --policy MODEL ...` on any task or data):
1. the policy: `--policy MODEL` (any causal LM with the task's tokenizer), or `behaviour_clone`: the task's tiny
   model (`--policy_n_layer` x `--policy_n_embd`) cloned from the task's data first; saved as `OUTPUT_DIR/policy`;
2. its rollouts on the training prompts (`tokenq.rollouts.collect`, plain sampling, scored by the task's reward),
   written to `OUTPUT_DIR/rollouts.jsonl` as outcome rows; with `--rollin_rounds R` R more rounds follow, each
   rolling in with the policy steered by the critic so far and rolling out with the policy (Q♯'s data collection,
   `tokenq.rollouts.collect(rollin=...)`), then training on every round's rows;
3. the critic: a `TokenQModel` on its own (smaller) backbone, trained only on those rollouts with the value
   objective (Monte-Carlo regression of V and Q under the policy, CD-FUDGE / VGS; with `--value_loss bce` on 0/1
   rewards, the Bernoulli distribution of the return: Q♯'s distributional critic, read as `Q_eta` at decoding);
4. evaluation: the policy plain, and steered by the critic at each `--eval_betas` and `--eval_etas`.
`OUTPUT_DIR` is the critic checkpoint; `metrics.json` holds `plain_reward`, `guided_reward` (at `--guided_beta`),
`policy_parameters`, `critic_parameters` (backbones) and the sweep rows; `reward_vs_kl.png` plots the sweep.
A policy or rollouts file already in `OUTPUT_DIR` is reused, never overwritten.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import IntervalStrategy

from tokenq.atomic import staged_folder
from tokenq.data import load_rows, load_tokenizer
from tokenq.evaluation import beta_configs, can_score, eta_configs, sweep
from tokenq.outputs import claim_training_output
from tokenq.reporting import KNOBS, plot_sweep
from tokenq.rollouts import collect, policy_model, text_prompts, write_rows
from tokenq.sft import behaviour_cloning
from tokenq.verdict import behaviour_of, verdict

BEHAVIOUR_CLONE = "behaviour_clone"


@dataclass
class CriticArguments:
    """The policy a critic is trained for, and how its rollouts are collected (`tokenq value --policy ...`)."""

    policy: str | None = field(
        default=None, metadata={"help": "Train a critic for this frozen policy, on its own rollouts: a causal LM (folder / "
                                "Hub id) with the task's tokenizer, or 'behaviour_clone' (the task's tiny model cloned "
                                "from the task's data first). None: the usual value training on the data as given."})
    policy_n_layer: int = field(default=4, metadata={"help": "behaviour_clone: the policy's layers."})
    policy_n_embd: int = field(default=128, metadata={"help": "behaviour_clone: the policy's width."})
    policy_bc_steps: int = field(default=1000, metadata={"help": "behaviour_clone: cloning steps on the task's data."})
    policy_bc_learning_rate: float = field(default=3e-3, metadata={"help": "behaviour_clone: its learning rate."})
    collect_prompts: int | None = field(default=None, metadata={"help": "Collect on the first N distinct training prompts."})
    collect_num_samples: int = field(default=4, metadata={"help": "Rollouts per prompt (and per roll-in round)."})
    collect_temperature: float = field(default=1.0, metadata={"help": "The policy's sampling temperature for rollouts."})
    rollin_rounds: int = field(
        default=0, metadata={"help": "Q♯'s later rounds: roll in with the policy steered by the critic so far, roll out "
                             "with the policy; the critic is retrained on every round's rows."})
    rollin_beta: float = field(default=4.0, metadata={"help": "Guidance strength of the roll-in."})
    guided_beta: float = field(default=16.0, metadata={"help": "The beta `guided_reward` reports (one of --eval_betas)."})


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def frozen_policy(run, args: CriticArguments, out: Path):
    """The policy (eval mode, no gradient): `args.policy` loaded (its tokenizer must be the run's), or the behaviour
    clone: `OUTPUT_DIR/policy` when a previous run left it there, else trained now and saved there (whole or not at
    all)."""
    if args.policy != BEHAVIOUR_CLONE:
        theirs = load_tokenizer(args.policy).get_vocab()
        if theirs != run.tokenizer.get_vocab():
            raise ValueError(f"--policy {args.policy}: its tokenizer is not the critic's ({len(theirs)} vs "
                             f"{len(run.tokenizer.get_vocab())} tokens, or other ids): a critic reads the policy's tokens")
        return AutoModelForCausalLM.from_pretrained(args.policy).eval().requires_grad_(False)
    saved = out / "policy"
    if saved.is_dir():
        print(f"policy: reusing {saved}")
        return AutoModelForCausalLM.from_pretrained(saved).eval().requires_grad_(False)
    if run.task is None or not hasattr(run.task, "model_config"):
        raise ValueError("--policy behaviour_clone needs a built-in task (its tiny model); name your policy: --policy MODEL")
    config = run.task.model_config(run.tokenizer, n_layer=args.policy_n_layer, n_embd=args.policy_n_embd,
                                   n_head=run.data_args.n_head)
    policy = AutoModelForCausalLM.from_config(config)
    with staged_folder(saved) as tmp:
        behaviour_cloning(policy, run.tokenizer, run.dataset, str(tmp / "bc_run"), max_steps=args.policy_bc_steps,
                          batch_size=run.train_args.per_device_train_batch_size, learning_rate=args.policy_bc_learning_rate,
                          seed=run.train_args.seed, disable_tqdm=True)
        shutil.rmtree(tmp / "bc_run", ignore_errors=True)
        policy.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    return policy.eval().requires_grad_(False)


def rollouts(run, args: CriticArguments, policy, out: Path, round_: int = 0, critic=None) -> Dataset:
    """Round `round_`'s rollouts (`OUTPUT_DIR/rollouts.jsonl`, `rollouts-R.jsonl` for roll-in rounds), reused when
    already written: the policy's own samples, or (with `critic`) Q♯'s roll-in with the steered policy and roll-out
    with the policy. Outcome rows (the return the critic learns is the task's reward)."""
    path = out / ("rollouts.jsonl" if round_ == 0 else f"rollouts-{round_}.jsonl")
    if path.is_file():
        rows = load_rows(str(path), what="--output_dir rollouts")
        if set(rows["policy"]) != {args.policy}:
            raise ValueError(f"{path} holds rollouts of {sorted(set(rows['policy']))}, not of --policy {args.policy}: "
                             "give another --output_dir (nothing there is overwritten)")
        print(f"rollouts: reusing {path}")
        return rows
    prompts = text_prompts(run.dataset)[: args.collect_prompts]
    how = "sample" if critic is None else f"rollin beta={args.rollin_beta:g}"
    rollin = None if critic is None else {"critic": critic, "beta": args.rollin_beta}
    rows, stats = collect(policy_model(policy), run.tokenizer, run.task, prompts, num_samples=args.collect_num_samples,
                          seed=run.train_args.seed + 1000 * round_, batch_size=256, outcome_rows=True, rollin=rollin,
                          provenance={"round": round_, "policy": args.policy, "strategy": how},
                          strategy="sample", beta=0.0, temperature=args.collect_temperature)
    write_rows(rows, path)
    print(f"rollouts: {len(rows)} rows ({how}) -> {path}; mean reward {sum(r['reward'] for r in rows) / max(1, len(rows)):.3f}")
    return Dataset.from_list(rows)


def all_rollouts(parts: list[Dataset]) -> Dataset:
    return parts[0] if len(parts) == 1 else concatenate_datasets([parts[0], *(p.cast(parts[0].features) for p in parts[1:])])


HELD_OUT_SAMPLES = 2  # the policy's rollouts per evaluation prompt that judge the critic (the verdict)


def held_out_rollouts(run, args: CriticArguments, policy) -> Dataset:
    """The policy's own rollouts on the task's evaluation prompts (no training prompt): the held-out rows the
    verdict judges the critic by (its rank of their returns)."""
    rows, _ = collect(policy_model(policy), run.tokenizer, run.task, run.task.eval_prompts(), num_samples=HELD_OUT_SAMPLES,
                      seed=run.train_args.seed + 1, batch_size=256, outcome_rows=True, strategy="sample", beta=0.0,
                      temperature=args.collect_temperature)
    return Dataset.from_list(rows)


def evaluate_critic(run, args: CriticArguments, policy, critic, diagnostics: dict | None = None) -> dict:
    """The policy plain (beta 0) and steered by the critic at each `--eval_betas` (and `--guided_beta`) and
    `--eval_etas`, on the task's evaluation prompts; the figures of the module docstring, the verdict (with the
    critic's value `diagnostics` on held-out rollouts); `reward_vs_kl.png`."""
    d, out = run.data_args, Path(run.train_args.output_dir)
    betas = sorted({0.0, *map(float, d.eval_betas), float(args.guided_beta)})
    configs = beta_configs(betas) + eta_configs(d)
    rows = sweep(policy, run.tokenizer, run.task, configs, d.eval_samples_per_prompt, run.train_args.seed, critic=critic,
                 **d.filter_kwargs())
    at_beta = {r["beta"]: r["reward"] for r in rows if "beta" in r}
    best = max(rows, key=lambda r: r["reward"])
    behaviour, per_prompt = behaviour_of(run.task)
    metrics = {"verdict": verdict(diagnostics, rows, behaviour, per_prompt), "task": run.task.name,
               "behavior_reward": behaviour, "plain_reward": at_beta[0.0],
               "guided_reward": at_beta[float(args.guided_beta)], "guided_beta": args.guided_beta,
               "policy_parameters": parameters(policy), "critic_parameters": parameters(critic.backbone),
               "critic_head_parameters": parameters(critic.heads), "rollouts": len(run.dataset),
               "rollin_rounds": args.rollin_rounds, "eval": rows, "eval_filter": d.filter_kwargs(),
               "eval_samples_per_prompt": d.eval_samples_per_prompt,
               "best": {k: v for k, v in best.items() if k in ("strategy", "reward", *KNOBS)}}
    curves = [{**r, "strategy": "sample, eta" if "eta" in r else "sample, beta"} for r in rows]
    plot_sweep(curves, "kl", out / "reward_vs_kl.png", "KL(steered policy || policy), nats per sequence", metrics["plain_reward"],
               baseline_label="the policy, plain sampling")
    return metrics


def critic_for_policy(run, args: CriticArguments, start: float) -> dict:
    """The whole command of the module docstring; returns the metrics (on the main process; {} elsewhere)."""
    from tokenq.runner import finish, prepare_data, prepare_model, report, train
    from tokenq.trainers.value import ValueTrainer

    out = Path(run.train_args.output_dir)
    data = prepare_data(run)
    claim_training_output(run.train_args, run.command, inputs=("policy", "rollouts*.jsonl"))  # those two are reused
    if not can_score(run.task):
        raise ValueError("a critic for a policy is trained on the policy's scored rollouts: name the task (--task, or "
                         "--dataset_name with --reward_fn)")
    policy = frozen_policy(run, args, out)
    parts, critic, trainer = [rollouts(run, args, policy, out)], None, None
    run.eval_rows = None  # held-out rows of the data are another policy's returns
    if run.train_args.eval_strategy != IntervalStrategy.NO:
        print("a critic for a policy: no evaluation during training (the held-out rows are the data's returns, not the "
              "policy's); the policy is evaluated plain and steered at the end")
        run.train_args.eval_strategy = IntervalStrategy.NO
    for r in range(args.rollin_rounds + 1):
        if r:
            parts.append(rollouts(run, args, policy, out, r, critic))
        run.dataset = all_rollouts(parts)
        prepare_model(run, data)  # a fresh critic each round, on every round's rollouts
        trainer = ValueTrainer(run.model, run.train_args, run.dataset, run.tokenizer)
        train(trainer, run)
        critic = run.model.eval()
    if not trainer.is_world_process_zero():
        finish(trainer, run)
        return {}
    diagnostics = trainer.value_diagnostics(held_out_rollouts(run, args, policy), model=critic)
    metrics = evaluate_critic(run, args, policy, critic, diagnostics)
    metrics["value_diagnostics"] = diagnostics
    print(f"policy {metrics['policy_parameters']:,} parameters, critic backbone {metrics['critic_parameters']:,}: plain "
          f"{metrics['plain_reward']:.3f}, steered at beta {args.guided_beta:g} {metrics['guided_reward']:.3f}")
    return report(trainer, run, metrics, start, plots=("reward_vs_kl.png",))
