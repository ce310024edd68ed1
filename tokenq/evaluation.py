"""Evaluate Q-guided decoding on a built-in task's evaluation prompts: sweeps over beta and over strategies."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from transformers import set_seed

from tokenq.generation import generate
from tokenq.modeling import TokenQModel


def complete(model: TokenQModel, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
             **generate_kwargs) -> tuple[list[str], dict[str, np.ndarray]]:
    """Completions of `prompts` by `tokenq.generate` (any strategy; decoded new tokens, special tokens
    dropped), in batches, and per prompt the output's `scores`, `generated_tokens`, `forward_passes`, `kl`."""
    tokenizer.padding_side = "left"
    device = model.unembed.device
    completions: list[str] = []
    stats: dict[str, list] = {"scores": [], "generated_tokens": [], "forward_passes": [], "kl": []}
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        completions += tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        kl = out.kl if out.kl is not None else torch.full_like(out.scores, float("nan"))
        for key, value in (("scores", out.scores), ("generated_tokens", out.generated_tokens),
                           ("forward_passes", out.forward_passes), ("kl", kl)):
            stats[key] += value.float().tolist()
    return completions, {k: np.asarray(v) for k, v in stats.items()}


def accuracy(model: TokenQModel, tokenizer, task, samples: int, seed: int, **generate_kwargs) -> tuple[float, float]:
    """(held-out accuracy, generated tokens per prompt) of `tokenq.generate` with these arguments."""
    set_seed(seed)
    prompts = [p for p in task.eval_prompts() for _ in range(samples)]
    completions, stats = complete(model, tokenizer, prompts, task.max_new_tokens, **generate_kwargs)
    return float(np.mean(task.score(prompts, completions)["reward"])), float(stats["generated_tokens"].mean())


def search_accuracy(model: TokenQModel, tokenizer, task, samples: int, seed: int, *, search_k: int, best_of_n: int,
                    **generate_kwargs) -> dict[str, float]:
    """Value-guided search by the model's value score: step search (K continuations per step; steps end at
    the task's `step_stop_strings`, else every token) and best-of-N, each with its accuracy and generated
    tokens per prompt (`step_search`, `step_search_tokens`, `best_of_n`, `best_of_n_tokens`)."""
    stops = getattr(task, "step_stop_strings", None)
    step = {"step_stop_strings": list(stops)} if stops else {"step_tokens": 1}
    out = {}
    out["step_search"], out["step_search_tokens"] = accuracy(
        model, tokenizer, task, samples, seed, strategy="step_search", num_continuations=search_k, **step, **generate_kwargs)
    out["best_of_n"], out["best_of_n_tokens"] = accuracy(
        model, tokenizer, task, samples, seed, strategy="best_of_n", num_candidates=best_of_n, **generate_kwargs)
    return out


def sweep(model: TokenQModel, tokenizer, task, configs: list[dict], samples_per_prompt: int, seed: int = 0,
          **common) -> list[dict]:
    """Run every decoding configuration (`tokenq.generate` keyword arguments, e.g. `{"strategy":
    "best_of_n", "num_candidates": 4, "beta": 0}`) on the task's evaluation prompts; per configuration the
    mean task reward, KL estimate, generated tokens and forward passes per prompt."""
    prompts = [p for p in task.eval_prompts() for _ in range(samples_per_prompt)]
    rows = []
    for config in configs:
        set_seed(seed)
        completions, stats = complete(model, tokenizer, prompts, task.max_new_tokens, **common, **config)
        reward = task.score(prompts, completions)["reward"]
        kl = None if np.isnan(stats["kl"]).all() else float(stats["kl"].mean())  # greedy / beam: no KL
        rows.append({**config, "reward": float(np.mean(reward)), "kl": kl,
                     "generated_tokens": float(stats["generated_tokens"].mean()),
                     "forward_passes": float(stats["forward_passes"].mean()), "value_score": float(np.mean(stats["scores"]))})
    return rows


def evaluate_betas(
    model: TokenQModel,
    tokenizer,
    task,
    betas: list[float],
    samples_per_prompt: int = 10,
    seed: int = 0,
    **sample_kwargs,
) -> list[dict[str, float]]:
    """For each beta: mean reward (the task's metric, e.g. optimality), length and success over
    `samples_per_prompt` guided samples of every evaluation prompt. `sample_kwargs`: `guided_sample`'s
    filter (`temperature`, `top_k`, `top_p`)."""
    prompts = [p for p in task.eval_prompts() for _ in range(samples_per_prompt)]
    rows = []
    for beta in betas:
        set_seed(seed)
        completions, _ = complete(model, tokenizer, prompts, task.max_new_tokens, strategy="sample", beta=beta, **sample_kwargs)
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


@contextlib.contextmanager
def training_rng_kept(device: torch.device):
    """Run the block without moving the training's random streams (python, numpy, torch on the CPU and on
    `device`, the process's accelerator if any). The evaluation during training seeds them, so that its
    points are comparable; without this it would also change the rest of the training (the data order of
    later epochs, dropout): a run with `--eval_strategy steps` would train another model than without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    accelerator = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=accelerator, device_type=None if device.type == "cpu" else device.type):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class GuidedEval:
    """The learning curve of the guided policy, for `TokenQTrainer(guided_eval=...)`: guided sampling at `beta`
    on the task's evaluation prompts (a cheap pass: `samples_per_prompt` samples each, a fixed seed so that
    points are comparable). Called by the trainer's `evaluate` (`--eval_strategy steps --eval_steps N`),
    whose `log` carries `eval_optimality`, `eval_length`, `eval_reached` to `report_to`."""

    def __init__(self, tokenizer, task, beta: float, samples_per_prompt: int = 10, seed: int = 0, **sample_kwargs) -> None:
        self.tokenizer, self.task, self.beta = tokenizer, task, beta
        self.samples, self.seed, self.sample_kwargs = samples_per_prompt, seed, sample_kwargs

    def __call__(self, model: TokenQModel) -> dict[str, float]:
        with training_rng_kept(model.unembed.device):
            row = evaluate_betas(model, self.tokenizer, self.task, [self.beta], self.samples, self.seed, **self.sample_kwargs)[0]
        return {"optimality": row["optimality"], "length": row["length"], "reached": row["reached"], "beta": self.beta}
