"""Improvement rounds (`tokenq iterate`): round 0 trains Q (ILQL) on the given data and extracts a policy; round r >= 1
collects rollouts with round r - 1's policy, adds them to the data, retrains Q from its last weights and extracts
again, starting from the previous policy.

Layout of `OUTPUT_DIR`: `round-R/` per finished round (`q/`: the critic, a tokenq checkpoint; `policy/`: the
extracted plain HF causal LM; `rollouts.jsonl`: the rows collected in round R >= 1; `round.json`: its figures),
`policy/` (the last round's policy), `metrics.json` (`rounds`: one record per round), `reward_vs_round.png` and
`README.md`. A round is built in a temporary folder and appears whole when it ends: a stopped run resumes at the
round it was in (re-run the same command), and no finished round is lost or trained again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from peft import get_peft_model
from transformers import AutoModelForCausalLM, set_seed

from tokenq.atomic import replace_file, staged_folder
from tokenq.backbone import peft_config
from tokenq.checkpoint_checks import read_json
from tokenq.data import load_rows, outcome_only
from tokenq.evaluation import beta_configs, complete, sweep
from tokenq.extraction import extract, save_policy, starting_policy
from tokenq.losses import action_logprob
from tokenq.mdp import detect_format
from tokenq.modeling import TokenQModel
from tokenq.reporting import plot_rounds, rounds_table, write_json
from tokenq.rollouts import collect, policy_model, text_prompts, write_rows
from tokenq.tasks.protocol import checked_scores, mean_scores
from tokenq.trainers import IQLTrainer
from tokenq.trainers.base import TokenQTrainingArguments
from tokenq.verdict import behaviour_of, verdict

ROUND_FILE = "round.json"
# Settings that do not change what a round computes: a re-run may change them (and `rounds`, to add rounds).
NOT_SETTINGS = {"rounds", "output_dir", "logging_dir", "run_name", "overwrite", "resume_from_checkpoint", "report_to",
                "disable_tqdm", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_strategy",
                "hub_always_push", "hub_revision"}


@dataclass
class LoopArguments:
    """The rounds of `tokenq iterate` (Q's training: the IQL fields; extraction: `ExtractionArguments`)."""

    rounds: int = field(default=3, metadata={"help": "Improvement rounds after round 0 (collect, retrain Q, extract)."})
    q_steps: int = field(default=300, metadata={"help": "ILQL steps in each round >= 1 (round 0: --max_steps)."})
    extract_steps: int = field(default=300, metadata={"help": "Optimiser steps of each extraction."})
    extract_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of each extraction."})
    collect_prompts: int | None = field(default=None, metadata={"help": "Training prompts collected on per round (None: all)."})
    collect_num_samples: int = field(default=1, metadata={"help": "Completions per prompt per round."})
    collect_temperature: float = field(default=1.0, metadata={"help": "Exploration: the sampling temperature of collection."})
    collect_beta: float = field(
        default=0.0, metadata={"help": "Exploration: 0 collects with the round's extracted policy; > 0 with the round's Q "
                               "guiding its own LM at this beta."})
    guided_beta: float | None = field(default=None, metadata={"help": "The beta of `guided_reward` (default: max --eval_betas)."})

    def __post_init__(self) -> None:
        for name in ("rounds", "q_steps", "extract_steps", "collect_num_samples"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise ValueError(f"--{name} must be >= {0 if name == 'rounds' else 1}, got {getattr(self, name)}")


def finished_rounds(out: Path) -> list[int]:
    """The rounds 0, 1, ... whose folders are there (each appeared whole), up to the first missing one."""
    r = 0
    while (out / f"round-{r}" / ROUND_FILE).is_file():
        r += 1
    return list(range(r))


def start_over(out: Path) -> None:
    """`--overwrite true`: the finished rounds in `out` are removed (the rest of the outputs is rewritten)."""
    for r in finished_rounds(out):
        shutil.rmtree(out / f"round-{r}")
        print(f"--overwrite true: removed {out / f'round-{r}'}")


@torch.no_grad()
def kl_to(policy, initial, tokenizer, prompts: list[str], completions: list[str], add_special_tokens: bool = True,
          batch_size: int = 64) -> float:
    """Monte-Carlo KL(policy || initial) per sequence: the mean over the policy's own samples (`completions` of
    `prompts`) of `sum_t log policy(a_t|s_t) - log initial(a_t|s_t)` over each completion's tokens and its EOS."""
    device, total = next(policy.parameters()).device, 0.0
    for i in range(0, len(prompts), batch_size):
        chunk, done = prompts[i : i + batch_size], completions[i : i + batch_size]
        starts = [len(ids) - 1 for ids in tokenizer(chunk, add_special_tokens=add_special_tokens).input_ids]
        enc = tokenizer([p + c + tokenizer.eos_token for p, c in zip(chunk, done)], return_tensors="pt", padding=True,
                        padding_side="right", add_special_tokens=add_special_tokens).to(device)
        positions = torch.arange(enc.input_ids.shape[1], device=device)
        acting = (positions >= torch.tensor(starts, device=device)[:, None]) & (positions < enc.attention_mask.sum(1, keepdim=True) - 1)
        a_t = enc.input_ids.roll(-1, dims=1)[acting]
        logp = [action_logprob(m(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[acting], a_t)
                for m in (policy, initial)]
        total += float((logp[0] - logp[1]).sum())
    return total / len(prompts)


def evaluate_round(policy, q_model: TokenQModel, initial, tokenizer, task, data_args, guided_beta: float, seed: int,
                   diagnostics: dict | None = None) -> dict:
    """The round's figures on the task's held-out prompts: plain sampling of the extracted policy (`policy_reward`, the
    task's extras as `policy_<name>`, `tokens_per_prompt`, and `kl_to_initial` on those samples), guided sampling
    with the round's Q (`guided_reward`, `guided_tokens_per_prompt`), and the verdict on the round's Q (its value
    `diagnostics` on held-out rows; guided sampling against plain sampling of Q's own LM and the data)."""
    prompts = [p for p in task.eval_prompts() for _ in range(data_args.eval_samples_per_prompt)]
    special = getattr(task, "prompt_add_special_tokens", True)
    set_seed(seed)
    completions, stats = complete(policy_model(policy), tokenizer, prompts, task.max_new_tokens, add_special_tokens=special,
                                  strategy="sample", beta=0.0, **data_args.filter_kwargs())
    plain = mean_scores(checked_scores(task, prompts, completions))
    rows = sweep(q_model, tokenizer, task, beta_configs([0.0, guided_beta]), data_args.eval_samples_per_prompt, seed,
                 **data_args.filter_kwargs())
    guided = rows[1]
    said = verdict(diagnostics, rows, *behaviour_of(task))
    print(f"verdict: {said['message']}")
    return {"verdict": said, "policy_reward": plain.pop("reward"), "guided_reward": guided["reward"],
            "tokens_per_prompt": float(stats["generated_tokens"].mean()), "guided_tokens_per_prompt": guided["generated_tokens"],
            "kl_to_initial": kl_to(policy, initial, tokenizer, prompts, completions, special),
            **{f"policy_{k}": v for k, v in plain.items()}}


@dataclass
class Loop:
    """What every round reads: the parsed run (data, task, tokenizer, IQL settings), the loop and extraction settings."""

    run: object  # tokenq.runner.Run, its data prepared
    loop: LoopArguments
    ex: object  # ExtractionArguments
    out: Path

    def train_args(self, output_dir: Path, max_steps: int, learning_rate: float | None = None) -> TokenQTrainingArguments:
        """The round's ILQL arguments (`learning_rate` None), or the extraction's (with its rate): one batch size,
        seed, precision and logging for both."""
        a = self.run.train_args
        if learning_rate is None:
            return replace(a, output_dir=str(output_dir), max_steps=max_steps, save_strategy="no", eval_strategy="no")
        return TokenQTrainingArguments(
            output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate, lr_scheduler_type="cosine",
            warmup_steps=min(50, max_steps // 10), per_device_train_batch_size=a.per_device_train_batch_size,
            gradient_accumulation_steps=a.gradient_accumulation_steps, seed=a.seed, logging_steps=a.logging_steps,
            report_to=a.report_to, save_strategy="no", max_length=a.max_length, bf16=a.bf16, use_cpu=a.use_cpu,
            disable_tqdm=a.disable_tqdm, dataloader_pin_memory=False)


def settings(loop: Loop) -> dict:
    """Every setting of the run (data, Q's training, model, heads, loop, extraction) as JSON values, `NOT_SETTINGS`
    left out: what `round.json` records and a re-run must match."""
    run = loop.run
    groups = {"data": asdict(run.data_args), "training": run.train_args.to_dict(), "model": asdict(run.model_args),
              "heads": asdict(run.head_config), "loop": asdict(loop.loop), "extraction": asdict(loop.ex)}
    flat = {f"{group}.{k}": v for group, values in groups.items() for k, v in values.items() if k not in NOT_SETTINGS}
    return json.loads(json.dumps(flat, default=str))


def check_settings(recorded: dict | None, current: dict, out: Path) -> None:
    """A re-run continues the finished rounds only with the settings they were made with (`--rounds` may grow)."""
    if recorded is None:
        raise ValueError(f"{out}/round-0/{ROUND_FILE} records no settings (an older tokenq wrote it): continue it with "
                         "that tokenq, or start over (--overwrite true, or another --output_dir)")
    changed = [f"{k.split('.', 1)[1]}: {recorded.get(k)!r} -> {current.get(k)!r}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if changed:
        raise ValueError(f"{out} holds rounds made with other settings ({'; '.join(changed)}): a re-run continues them "
                         "with the same settings (only --rounds may change); use another --output_dir, or --overwrite "
                         "true to start over")


def with_provenance(rows: Dataset, round_: int, policy: str, strategy: str) -> Dataset:
    """`rows` with the provenance columns and `truncated` (as collected rows have them; kept where already there)."""
    for name, value in (("round", round_), ("policy", policy), ("strategy", strategy), ("truncated", False)):
        if name not in rows.column_names:
            rows = rows.add_column(name, [value] * len(rows))
    return rows


def collect_round(loop: Loop, r: int, policy, q_model: TokenQModel) -> list[dict]:
    """Round r's rollouts on the training prompts: the previous policy sampled at `collect_temperature`, or (with
    `collect_beta` > 0) the previous Q guiding its own LM; scored by the task."""
    run, lp = loop.run, loop.loop
    prompts = text_prompts(run.dataset)[: lp.collect_prompts]
    guided = lp.collect_beta > 0
    strategy = f"sample beta={lp.collect_beta:g} temperature={lp.collect_temperature:g}"
    rows, _ = collect(q_model if guided else policy_model(policy), run.tokenizer, run.task, prompts,
                      num_samples=lp.collect_num_samples, seed=run.train_args.seed + 1000 * r, batch_size=256,
                      provenance={"round": r, "policy": f"round-{r - 1}/{'q' if guided else 'policy'}", "strategy": strategy},
                      strategy="sample", beta=lp.collect_beta, temperature=lp.collect_temperature)
    return rows


def run_round(loop: Loop, r: int, tmp: Path, rows: Dataset) -> tuple[dict, Dataset]:
    """One round into the staging folder `tmp`; returns (its record, the rows Q trained on)."""
    run, lp, start = loop.run, loop.loop, time.time()
    prev = loop.out / f"round-{r - 1}"
    if r == 0:
        q_model, steps = run.model, run.train_args.max_steps
        policy = None
    else:
        q_model, steps = TokenQModel.from_pretrained(prev / "q", is_trainable=True), lp.q_steps  # LoRA: still trained
        policy = AutoModelForCausalLM.from_pretrained(prev / "policy")  # merged: a fresh adapter on it with --use_peft
        if run.model_args.use_peft:
            policy = get_peft_model(policy, peft_config(run.model_args))
        collected = collect_round(loop, r, policy, q_model)
        write_rows(collected, tmp / "rollouts.jsonl")
        added = outcome_only(Dataset.from_list(collected, features=rows.features), run.data_args.drop_step_rewards)
        rows = concatenate_datasets([rows, added])
    trainer = IQLTrainer(q_model, loop.train_args(tmp / "q_run", steps), rows, run.tokenizer)
    trainer.train()
    q_model.save_pretrained(tmp / "q", tokenizer=run.tokenizer)
    shutil.rmtree(tmp / "q_run", ignore_errors=True)
    if policy is None:
        policy = starting_policy(q_model, replace(run.model_args, model_name_or_path=None))
    ex_args = loop.train_args(tmp / "extract_run", lp.extract_steps, lp.extract_learning_rate)
    policy, facts = extract(policy, q_model, run.tokenizer, rows, ex_args, loop.ex, task=run.task,
                            prompts=text_prompts(rows))
    shutil.rmtree(tmp / "extract_run", ignore_errors=True)
    initial = q_model.backbone if r == 0 else TokenQModel.from_pretrained(loop.out / "round-0" / "q").backbone
    beta = lp.guided_beta if lp.guided_beta is not None else max(run.data_args.eval_betas)
    diagnostics = None if run.eval_rows is None else trainer.value_diagnostics(run.eval_rows, model=q_model)
    figures = evaluate_round(policy, q_model.eval(), initial, run.tokenizer, run.task, run.data_args, beta, run.train_args.seed,
                             diagnostics)
    record = {"round": r, **figures, "rows": len(rows), "q_steps": steps, "guided_beta": beta, "extraction": facts,
              "settings": settings(loop)}
    save_policy(policy, run.tokenizer, tmp / "policy", source=f"round-{r}/q", facts=facts, ex=loop.ex, results=figures)
    record["seconds"] = time.time() - start
    trainer.log({f"round/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
    write_json(tmp / ROUND_FILE, record)
    return record, rows


def check_format(rows: Dataset, task) -> None:
    """Collected rows join the data: it must be in the format `tokenq.rollouts.rows_of` writes for this task."""
    fmt = detect_format(rows.column_names)
    written = "process" if hasattr(task, "process_rewards") else "outcome"
    if fmt != written:
        raise ValueError(f"tokenq iterate adds the rows it collects, in the {written!r} format for task {task.name!r}, to "
                         f"your data, which is in the {fmt!r} format: convert your rows to {written!r} rows first")


def iterate(loop: Loop, prepare_model) -> dict:
    """Every round not yet finished in `loop.out`, in order (`prepare_model(run)` builds round 0's model when round 0
    is to run); after each round the outputs of the module docstring are rewritten. Returns the metrics."""
    run, out, start = loop.run, loop.out, time.time()
    check_format(run.dataset, run.task)
    if run.model_args.use_peft and not loop.ex.merge_lora:
        raise ValueError("tokenq iterate merges each round's LoRA adapter into the policy the next round starts from: "
                         "--merge_lora false is for tokenq extract")
    done = finished_rounds(out)
    history = [read_json(out / f"round-{r}" / ROUND_FILE) for r in done]
    if done:
        check_settings(history[0].get("settings"), settings(loop), out)
    rows = with_provenance(run.dataset, 0, run.data_args.dataset_name or getattr(run.task, "name", "data"), "given")
    for r in done[1:]:  # the data as the last finished round left it
        added = load_rows(str(out / f"round-{r}" / "rollouts.jsonl"), what="--output_dir rollouts")
        rows = concatenate_datasets([rows, added.cast(rows.features)])
    if done:
        print(f"{out}: rounds {done[0]}..{done[-1]} are finished; resuming at round {len(done)}")
    else:
        prepare_model(run)
    metrics = None
    for r in range(len(done), loop.loop.rounds + 1):
        with staged_folder(out / f"round-{r}") as tmp:  # a round appears whole, or not at all
            record, rows = run_round(loop, r, tmp, rows)
        history.append(record)
        metrics = publish(loop, history, time.time() - start)
    return metrics or publish(loop, history, time.time() - start)


def publish(loop: Loop, history: list[dict], seconds: float) -> dict:
    """`OUTPUT_DIR/policy` (the last round's), `metrics.json`, `reward_vs_round.png` and `README.md` (the rounds table)."""
    out, last = loop.out, history[-1]["round"]
    with staged_folder(out / "policy") as tmp:
        shutil.copytree(out / f"round-{last}" / "policy", tmp, dirs_exist_ok=True)
    task = loop.run.task
    behaviour = task.behavior_reward() if task is not None else None
    metrics = {"task": getattr(task, "name", None), "behavior_reward": behaviour, "method": loop.ex.method,
               "rounds": history, "wall_time_s": seconds}
    write_json(out / "metrics.json", metrics)
    plot_rounds(history, behaviour, out / "reward_vs_round.png", title=f"tokenq iterate on {metrics['task']} ({loop.ex.method})")
    table = rounds_table(history)
    card = (f"# tokenq iterate: {metrics['task']}\n\nPolicy extraction by `{loop.ex.method}`; behaviour data reward "
            f"{behaviour}. The last round's policy is `policy/` (a plain causal LM).\n\n{table}\n\n"
            "![reward vs round](reward_vs_round.png)\n")
    replace_file(out / "README.md", lambda tmp: tmp.write_text(card))
    print(table)
    return metrics
