"""Evaluate Q-guided decoding on a built-in task: a sweep over beta on the task's evaluation prompts."""

from __future__ import annotations

import numpy as np
from transformers import set_seed

from tokenq.generation import guided_sample
from tokenq.modeling import TokenQModel


def complete(model: TokenQModel, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256, **sample_kwargs) -> list[str]:
    """Guided completions of `prompts` (decoded new tokens, special tokens dropped), in batches."""
    tokenizer.padding_side = "left"
    device = model.unembed.device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        seqs = guided_sample(
            model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sample_kwargs,
        )
        out += tokenizer.batch_decode(seqs[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def evaluate_betas(
    model: TokenQModel,
    tokenizer,
    task,
    betas: list[float],
    samples_per_prompt: int = 10,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """For each beta: mean reward (the task's metric, e.g. optimality), length and success over
    `samples_per_prompt` guided samples of every evaluation prompt."""
    prompts = [p for p in task.eval_prompts() for _ in range(samples_per_prompt)]
    rows = []
    for beta in betas:
        set_seed(seed)
        completions = complete(model, tokenizer, prompts, task.max_new_tokens, beta=beta, top_k=top_k, temperature=temperature)
        scores = task.score(prompts, completions)
        rows.append({
            "beta": float(beta),
            "optimality": float(np.mean(scores["reward"])),
            "length": float(np.mean(scores["length"])),
            "reached": float(np.mean(scores["reached"])),
        })
    return rows


def behaviour_metrics(task) -> dict[str, float]:
    """The dataset's own metrics (what the behaviour policy achieved)."""
    data = task.dataset()
    scores = task.score(data["prompt"], data["completion"])
    return {
        "behavior_optimality": float(np.mean(scores["reward"])),
        "behavior_length": float(np.mean(scores["length"])),
        "behavior_reached": float(np.mean(scores["reached"])),
    }

