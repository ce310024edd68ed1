"""A deployable policy from a trained critic (`tokenq extract`, and every round of `tokenq iterate`).

- `awr` / `best_of_n`: `tokenq.trainers.AWRTrainer` / `BestOfNTrainer` on the data's states.
- `dpo` (Agent Q, Putta et al. 2024): a step-level search from each training prompt — at every node
  `num_candidates` rollouts of the policy, ranked by the critic's value score of their first step (summed
  advantages) or by the task's reward of the whole rollout, the search going on from the best first step — turned
  into preference pairs (the best and the worst rollout of each node, `preference_pairs`) and trained with trl's
  `DPOTrainer` against the policy it started from; XPO's exploration term as an option (`xpo_alpha`).

The result is a plain HF causal LM (`save_policy`): `AutoModelForCausalLM.from_pretrained(folder)` loads it, and
vLLM, TGI or `model.generate` serve it without tokenq.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import get_peft_model
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from tokenq.atomic import staged_folder
from tokenq.backbone import load_backbone, peft_config
from tokenq.evaluation import complete
from tokenq.mdp import detect_format
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.outputs import resume_value
from tokenq.rollouts import policy_model
from tokenq.sft import restore_forward
from tokenq.trainers.extract import AWRTrainer, BestOfNTrainer, ExtractionArguments

TRAINERS = {"awr": AWRTrainer, "best_of_n": BestOfNTrainer}


def first_step(completion: str, stop_strings) -> tuple[str, bool]:
    """(the completion up to and including its first stop string, whether that is the whole completion)."""
    ends = [completion.find(s) + len(s) for s in stop_strings or () if s in completion]
    end = min(ends) if ends else len(completion)
    return completion[:end], end >= len(completion)


def preference_pairs(nodes: list[dict]) -> list[dict]:
    """DPO rows from searched nodes: for each node (`{"prompt", "prefix", "candidates": [{"completion", "score"},
    ...]}`) whose candidates do not all score the same, `{"prompt": prompt + prefix, "chosen": the best candidate's
    completion, "rejected": the worst one's}` (ties: the first)."""
    pairs = []
    for node in nodes:
        scores = [c["score"] for c in node["candidates"]]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] > scores[worst]:
            pairs.append({"prompt": node["prompt"] + node["prefix"],
                          "chosen": node["candidates"][best]["completion"],
                          "rejected": node["candidates"][worst]["completion"]})
    return pairs


@torch.no_grad()
def step_advantages(critic: TokenQModel, tokenizer, bases: list[str], steps: list[str], add_special_tokens: bool = True) -> list[float]:
    """The critic's value score of each `step` taken after its `base` text: the summed advantages
    `sum_t Qbar(s_t, a_t) - V(s_t)` over the step's tokens (with gamma 1, the step's rewards plus the value after it,
    minus the value before: what tokenq's step search ranks by). One right-padded forward of the critic."""
    base_lengths = [len(ids) for ids in tokenizer(bases, add_special_tokens=add_special_tokens).input_ids]
    enc = tokenizer([b + s for b, s in zip(bases, steps)], return_tensors="pt", padding=True, padding_side="right",
                    add_special_tokens=add_special_tokens).to(critic.unembed.device)
    h = critic.features(enc.input_ids, enc.attention_mask)
    positions = torch.arange(enc.input_ids.shape[1], device=h.device)
    lengths = torch.tensor(base_lengths, device=h.device)
    in_step = (positions >= lengths[:, None] - 1) & (positions < enc.attention_mask.sum(1, keepdim=True) - 1)
    adv = critic.action_value(h[in_step], enc.input_ids.roll(-1, dims=1)[in_step]) - critic.state_value(h[in_step])
    return torch.zeros(len(bases), device=h.device).index_add_(0, in_step.nonzero()[:, 0], adv).tolist()


def scored_steps(rollouts: list[str], stops, tokenizer) -> list[str]:
    """The first step of each rollout as the critic scores it: with the EOS when the step ends the completion (the
    outcome reward sits on the EOS)."""
    return [step + (tokenizer.eos_token if whole else "") for step, whole in (first_step(r, stops) for r in rollouts)]


def candidates(policy: TokenQModel, critic: TokenQModel, tokenizer, task, states: list[tuple[str, str]], n: int,
               temperature: float, rank_by: str, budget: int) -> tuple[list[str], list[float]]:
    """`n` rollouts of `policy` (plain sampling at `temperature`, at most `budget` tokens) from each (prompt, prefix)
    state, state by state, and their scores: the critic's value score of their first step (`rank_by="value"`,
    `step_advantages`) or the task's reward of prefix + rollout (`"reward"`)."""
    owners = [state for state in states for _ in range(n)]
    texts = [p + prefix for p, prefix in owners]
    special = getattr(task, "prompt_add_special_tokens", True)
    rollouts, _ = complete(policy, tokenizer, texts, budget, add_special_tokens=special, strategy="sample", beta=0.0,
                           temperature=temperature)
    if rank_by == "reward":
        return rollouts, task.score([p for p, _ in owners], [prefix + r for (_, prefix), r in zip(owners, rollouts)])["reward"]
    steps = scored_steps(rollouts, getattr(task, "step_stop_strings", None), tokenizer)
    return rollouts, step_advantages(critic, tokenizer, texts, steps, special)


def step_states(rows: Dataset) -> list[tuple[str, str]]:
    """(prompt, prefix) at every step boundary of the data's text rows: before each step of process rows, at the prompt
    of outcome rows (a step is then the whole completion)."""
    fmt = detect_format(rows.column_names)
    if fmt not in ("process", "outcome") or not all(isinstance(p, str) for p in rows["prompt"]):
        raise ValueError(f"best_of_n with --candidate step samples steps from text prompts: outcome or process rows, not "
                         f"{fmt!r} rows")
    states = []
    for row in rows:
        steps = row["steps"] if fmt == "process" else []
        states += [(row["prompt"], "".join(steps[:j])) for j in range(max(1, len(steps)))]
    return list(dict.fromkeys(states))


def best_step_rows(policy, critic: TokenQModel, tokenizer, task, rows: Dataset, ex: ExtractionArguments,
                   seed: int = 0) -> Dataset:
    """Best-of-N over steps (Digi-Q with a step as the action): at every step boundary of the data (`step_states`),
    `num_candidates` rollouts of the policy, the critic's best first step (`step_advantages`) kept as a process row
    to clone (`truncated` unless the step ends the completion, so that no EOS is added where the policy did not end)."""
    states = step_states(rows)
    set_seed(seed)
    rollouts, scores = candidates(policy_model(policy), critic, tokenizer, task, states, ex.num_candidates,
                                  ex.candidate_temperature, "value", task.max_new_tokens)
    stops = getattr(task, "step_stop_strings", None)
    best = []
    for j, (prompt, prefix) in enumerate(states):
        k = j * ex.num_candidates + int(np.argmax(scores[j * ex.num_candidates : (j + 1) * ex.num_candidates]))
        step, whole = first_step(rollouts[k], stops)
        best.append({"prompt": prompt + prefix, "steps": [step] if step else [], "step_rewards": [0.0] if step else [],
                     "truncated": not whole})
    return Dataset.from_list(best)


def search_nodes(policy: TokenQModel, critic: TokenQModel, tokenizer, task, prompts: list[str],
                 ex: ExtractionArguments, seed: int = 0) -> list[dict]:
    """The nodes of a step-level search from each prompt (all prompts at once, depth by depth): `num_candidates`
    rollouts of `policy` per node, their first steps (ending at the task's `step_stop_strings`; without them a
    rollout is one step) scored as `ex.rank_by` says (`step_advantages`, or the task's reward of the rollout); the
    search continues from the best first step until it ends the completion or the task's token budget is spent
    (the rollouts of one depth share the budget left to its shortest prefix)."""
    stops = getattr(task, "step_stop_strings", None)
    frontier = [(p, "") for p in prompts]
    nodes: list[dict] = []
    set_seed(seed)
    while frontier:
        used = [len(tokenizer(prefix, add_special_tokens=False).input_ids) for _, prefix in frontier]
        rollouts, scores = candidates(policy, critic, tokenizer, task, frontier, ex.num_candidates, ex.candidate_temperature,
                                      ex.rank_by, task.max_new_tokens - min(used))
        next_frontier = []
        for j, (prompt, prefix) in enumerate(frontier):
            k = slice(j * ex.num_candidates, (j + 1) * ex.num_candidates)
            scored = [{"completion": r, "score": float(s)} for r, s in zip(rollouts[k], scores[k])]
            nodes.append({"prompt": prompt, "prefix": prefix, "candidates": scored})
            step, whole = first_step(scored[int(np.argmax(scores[k]))]["completion"], stops)
            if not whole and used[j] + len(tokenizer(step, add_special_tokens=False).input_ids) < task.max_new_tokens:
                next_frontier.append((prompt, prefix + step))
        frontier = next_frontier
    return nodes


def starting_policy(critic: TokenQModel, model_args) -> torch.nn.Module:
    """The policy extraction starts from: `--model_name_or_path` when given (`tokenq.backbone.load_backbone`: LoRA
    with `--use_peft`, 4-bit), else a copy of the critic's own LM (an adapter merged into it), LoRA-wrapped with
    `--use_peft`."""
    if model_args.model_name_or_path:
        return load_backbone(model_args)
    policy = copy.deepcopy(critic.backbone)
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    policy.requires_grad_(True)  # a frozen critic's LM is trained here
    return get_peft_model(policy, peft_config(model_args)) if model_args.use_peft else policy


def dpo_extract(policy, tokenizer, task, prompts: list[str], critic: TokenQModel, train_args, ex: ExtractionArguments):
    """Agent Q's extraction: `search_nodes` from `prompts`, `preference_pairs`, then trl's `DPOTrainer` on them with
    the policy as it started as the reference. Trains `policy` in place and returns (policy, number of pairs)."""
    nodes = search_nodes(policy_model(policy), critic, tokenizer, task, prompts, ex, seed=train_args.seed)
    pairs = preference_pairs(nodes)
    if not pairs:
        raise ValueError(f"dpo: none of the {len(nodes)} searched nodes had candidates that scored differently: no "
                         "preference pair to train on (raise --num_candidates or --candidate_temperature)")
    a = train_args  # the extraction's optimisation settings, as DPO's (trl's configs default to bf16 on CPU too)
    config = DPOConfig(output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=a.per_device_train_batch_size,
                       gradient_accumulation_steps=a.gradient_accumulation_steps, learning_rate=a.learning_rate,
                       lr_scheduler_type=a.lr_scheduler_type, warmup_steps=a.warmup_steps, seed=a.seed,
                       logging_steps=a.logging_steps, report_to=a.report_to, save_strategy="no", bf16=a.bf16,
                       gradient_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=a.disable_tqdm,
                       use_cpu=a.use_cpu, beta=ex.dpo_beta, max_length=a.max_length,
                       **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -ex.xpo_alpha]} if ex.xpo_alpha else {}))
    reference = copy.deepcopy(policy).eval()
    policy.train()
    DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(pairs),
               processing_class=tokenizer).train()
    return restore_forward(policy).eval(), len(pairs)


def extract(policy, critic: TokenQModel, tokenizer, rows: Dataset, train_args, ex: ExtractionArguments, task=None,
            prompts: list[str] | None = None) -> tuple[object, dict]:
    """Train `policy` (an HF causal LM, LoRA-wrapped or not; trained in place) into the critic's extracted policy:
    awr / best_of_n on `rows` (any tokenq data format), dpo from a search on `prompts` scored by `task`. Returns
    (policy, facts for the card: method, steps, pairs)."""
    if ex.method == "dpo":
        if task is None or not prompts:
            raise ValueError("--method dpo searches from the data's text prompts and needs a task to score completions "
                             "(--task, or held-out rows with --reward_fn)")
        prompts = prompts[: ex.dpo_prompts] if ex.dpo_prompts else prompts
        policy, n_pairs = dpo_extract(policy, tokenizer, task, prompts, critic, train_args, ex)
        return policy, {"method": "dpo", "prompts": len(prompts), "pairs": n_pairs}
    if ex.method == "best_of_n" and ex.candidate == "step":
        if task is None:
            raise ValueError("best_of_n with --candidate step needs a task (its decoding budget and step ends)")
        rows = best_step_rows(policy, critic, tokenizer, task, rows, ex, seed=train_args.seed)
    model = TokenQModel(policy, TokenQConfig())
    trainer = TRAINERS[ex.method](model, train_args, rows, tokenizer, critic=critic, extraction=ex)
    result = trainer.train(resume_from_checkpoint=resume_value(train_args.resume_from_checkpoint))
    return policy.eval(), {"method": ex.method, "steps": result.global_step, "rows": len(rows),
                           "final_terms": trainer.last_logged_terms}


def save_policy(policy, tokenizer, folder: str | Path, *, source: str, facts: dict, ex: ExtractionArguments,
                results: dict | None = None) -> Path:
    """The extracted policy as a plain HF causal-LM folder (whole or absent): weights (a LoRA adapter merged unless
    `ex.merge_lora` is False: then the adapter, loadable with transformers' PEFT integration), tokenizer,
    `extraction.json` (what it came from, how, what it scored) and a model card saying the same."""
    folder = Path(folder)
    record = {"extracted_from": source, "extraction": {**asdict(ex), **facts}, "results": results or {}}
    with staged_folder(folder) as tmp:
        model = policy
        if hasattr(policy, "merge_and_unload") and ex.merge_lora:
            model = copy.deepcopy(policy).merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "extraction.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        policy_card(record).save(tmp / "README.md")
    return folder


def policy_card(record: dict) -> ModelCard:
    """A model card for an extracted policy: where it came from, the method and its settings, the results."""
    ex = record["extraction"]
    results = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in record["results"].items())
    text = f"""---
library_name: transformers
tags: [tokenq, policy-extraction, {ex["method"]}]
pipeline_tag: text-generation
---

# Policy extracted by tokenq ({ex["method"]})

A plain causal LM: load it with `AutoModelForCausalLM.from_pretrained` and serve it with any engine; no tokenq
needed at inference. It was extracted from the value function (critic) `{record["extracted_from"]}` by
`{ex["method"]}` (tokenq `extract`).

| setting | value |
|---|---|
{chr(10).join(f"| {k} | {v} |" for k, v in ex.items() if not isinstance(v, dict))}

## Results

| metric | value |
|---|---:|
{results or "| (not evaluated) | |"}
"""
    return ModelCard(text)
