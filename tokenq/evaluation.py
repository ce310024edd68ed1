"""Evaluate decoding on a task's evaluation prompts (any task of `tokenq.tasks.protocol`): sweeps over beta and
over strategies, the learning curve during training, the behaviour reference."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from transformers import set_seed

from tokenq.generation import generate
from tokenq.modeling import TokenQModel
from tokenq.tasks.protocol import checked_scores, mean_scores


def complete(model: TokenQModel, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
             add_special_tokens: bool = True, **generate_kwargs) -> tuple[list[str], dict[str, np.ndarray]]:
    """Completions of `prompts` by `tokenq.generate` (any strategy, any `critic=`; decoded new tokens, special tokens
    dropped: the text a reward function reads), in batches, and per prompt the output's `scores`, `generated_tokens`,
    `forward_passes`, `kl`, (with a separate critic) `critic_forward_passes`, `truncated` (no EOS within
    `max_new_tokens`) and `token_ids` (a list: each completion's tokens as generated, before its EOS).
    `add_special_tokens=False` for prompts already rendered with their special tokens (a chat template)."""
    device = model.get_output_embeddings().weight.device if not isinstance(model, TokenQModel) else model.unembed.device
    completions: list[str] = []
    token_ids: list[list[int]] = []
    stats: dict[str, list] = {"scores": [], "generated_tokens": [], "forward_passes": [], "kl": [], "critic_forward_passes": [],
                              "truncated": []}
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special_tokens).to(device)  # left: every row continues from its end
        out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        completions += tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        for row in out.sequences[:, enc.input_ids.shape[1] :].tolist():
            ids, ended = generated_ids(row, tokenizer.eos_token_id)
            token_ids.append(ids)
            stats["truncated"].append(not ended)
        kl = out.kl if out.kl is not None else torch.full_like(out.scores, float("nan"))
        for key, value in (("scores", out.scores), ("generated_tokens", out.generated_tokens),
                           ("forward_passes", out.forward_passes), ("kl", kl), ("critic_forward_passes", out.critic_forward_passes)):
            stats[key] += value.float().tolist() if value is not None else []
    arrays = {k: np.asarray(v) for k, v in stats.items() if v or k != "critic_forward_passes"}
    return completions, {**arrays, "token_ids": token_ids}


def generated_ids(row: list[int], eos: int) -> tuple[list[int], bool]:
    """(the tokens a completion generated, before its EOS; whether it ended with EOS) from its row of
    `GuidedOutput.sequences` (right-padded after the EOS). A row without EOS ran to the budget: every token of it
    was generated (a padding token too, if the policy emitted one)."""
    return (row[: row.index(eos)], True) if eos in row else (row, False)


def sweep(model: TokenQModel, tokenizer, task, configs: list[dict], samples_per_prompt: int, seed: int = 0,
          **common) -> list[dict]:
    """Run every decoding configuration (`tokenq.generate` keyword arguments, e.g. `{"strategy": "best_of_n",
    "num_candidates": 4, "beta": 0}`) on the task's evaluation prompts (`samples_per_prompt` decodes each, the
    seed set before each configuration). One row per configuration: the configuration, the mean `reward` and
    the task's named extras, the KL estimate, generated tokens, forward rows and value score per prompt, and
    `prompt_rewards` (each prompt's mean reward, in `eval_prompts()` order: the verdict's standard errors)."""
    prompts = [p for p in task.eval_prompts() for _ in range(samples_per_prompt)]
    special = getattr(task, "prompt_add_special_tokens", True)
    rows = []
    for config in configs:
        set_seed(seed)
        completions, stats = complete(model, tokenizer, prompts, task.max_new_tokens, add_special_tokens=special,
                                      **common, **config)
        scored = checked_scores(task, prompts, completions)
        scores = mean_scores(scored)
        kl = None if np.isnan(stats["kl"]).all() else float(stats["kl"].mean())  # greedy / beam: no KL
        critic = {"critic_forward_passes": float(stats["critic_forward_passes"].mean())} if "critic_forward_passes" in stats else {}
        rows.append({**config, **scores, "kl": kl, "generated_tokens": float(stats["generated_tokens"].mean()),
                     "forward_passes": float(stats["forward_passes"].mean()), **critic,
                     "value_score": float(np.mean(stats["scores"])),
                     "prompt_rewards": np.reshape(scored["reward"], (-1, samples_per_prompt)).mean(1).tolist()})
    return rows


def evaluate_betas(model: TokenQModel, tokenizer, task, betas: list[float], samples_per_prompt: int = 10, seed: int = 0,
                   **sample_kwargs) -> list[dict]:
    """Guided sampling at each beta (`sweep` rows: `beta`, `reward`, the task's extras, ...). `sample_kwargs`:
    pi_beta's filter (`temperature`, `top_k`, `top_p`)."""
    return sweep(model, tokenizer, task, beta_configs(betas), samples_per_prompt,
                 seed, **sample_kwargs)


def beta_configs(betas) -> list[dict]:
    """Guided sampling at each beta (`tokenq.generate` keyword arguments)."""
    return [{"strategy": "sample", "beta": float(b)} for b in betas]


def eta_configs(args) -> list[dict]:
    """Guided sampling at each `--eval_etas` value (`EvalArguments`): a distributional critic read as Q_eta."""
    return [{"strategy": "sample", "eta": float(e)} for e in args.eval_etas]


def step_definition(task, step_tokens: int | None = None, step_stop_strings: list[str] | None = None) -> dict:
    """Where a search step ends, as `tokenq.generate` keyword arguments: at `step_stop_strings`, else every
    `step_tokens` tokens, else at the task's `step_stop_strings`, else every token."""
    stops = step_stop_strings or (None if step_tokens else getattr(task, "step_stop_strings", None))
    return {"step_stop_strings": list(stops)} if stops else {"step_tokens": step_tokens or 1}


def search_configs(task, num_continuations: list[int], num_candidates: list[int], step_tokens: int | None = None,
                   step_stop_strings: list[str] | None = None, beta: float = 0.0) -> list[dict]:
    """Value-guided search configurations: step search at each K (steps as `step_definition` says) and best-of-N
    at each N."""
    step = step_definition(task, step_tokens, step_stop_strings)
    return ([{"strategy": "step_search", "num_continuations": k, "beta": beta, **step} for k in num_continuations]
            + [{"strategy": "best_of_n", "num_candidates": n, "beta": beta} for n in num_candidates])


def can_score(task) -> bool:
    """Whether completions can be scored on `task` (a user's data without `--reward_fn` cannot)."""
    return task is not None and getattr(task, "reward_fn", True) is not None


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
    whose `log` carries `eval_reward`, the task's extras (`eval_<name>`) and `eval_beta` to `report_to`."""

    def __init__(self, tokenizer, task, beta: float, samples_per_prompt: int = 10, seed: int = 0, **sample_kwargs) -> None:
        self.tokenizer, self.task, self.beta = tokenizer, task, beta
        self.samples, self.seed, self.sample_kwargs = samples_per_prompt, seed, sample_kwargs

    def __call__(self, model: TokenQModel) -> dict[str, float]:
        with training_rng_kept(model.unembed.device):
            row = evaluate_betas(model, self.tokenizer, self.task, [self.beta], self.samples, self.seed, **self.sample_kwargs)[0]
        skip = {"strategy", "kl", "generated_tokens", "forward_passes", "value_score", "prompt_rewards"}
        return {k: v for k, v in row.items() if k not in skip}
