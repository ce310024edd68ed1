"""Rollouts: a policy's completions of prompts, scored by the task, as rows of tokenq's data formats (`tokenq collect`).

A policy is a tokenq checkpoint (decoded with any strategy of `tokenq.generate`) or any HF causal LM (a folder or
Hub id, sampled plainly). Each prompt is completed `num_samples` times; the task's `score` gives the outcome
`reward`, and a task with `process_rewards` (arithmetic) also gives per-step rewards, so that rows are written in
the process format. Every row carries the provenance columns (`tokenq.mdp.PROVENANCE_COLUMNS`: round, policy,
strategy), which training reads past.

Data-parallel: the (prompt, sample) items are cut into fixed chunks of `batch_size`, chunk c is decoded with the
seed `seed + c` by process `c mod world_size`, and the chunks are gathered in order: any number of processes
writes the same rows as one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM, set_seed

from tokenq.atomic import replace_file
from tokenq.checkpoint import CONFIG_FILE
from tokenq.data import load_tokenizer
from tokenq.evaluation import complete
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.steering import check_same_vocabulary
from tokenq.tasks.protocol import checked_scores


def process_state() -> PartialState:
    """accelerate's process state: data-parallel over the launched processes (gloo on CPU when there is no GPU)."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_tokenq_checkpoint(name: str) -> bool:
    """Whether `name` (a local folder or a Hub id) holds a tokenq checkpoint, not a plain causal LM."""
    if Path(name).is_dir():
        return (Path(name) / CONFIG_FILE).is_file()
    from huggingface_hub import file_exists

    try:
        return file_exists(name, CONFIG_FILE)
    except Exception:  # offline, or no such repo: from_pretrained will say which
        return False


def load_policy(name: str) -> tuple[TokenQModel, bool]:
    """(model, guided): a tokenq checkpoint as it is (`guided` True: its heads can steer), or a plain HF causal LM
    wrapped in a `TokenQModel` whose fresh heads are never read (`guided` False: sampled plainly). Its tokenizer:
    `tokenq.data.load_tokenizer(name)`."""
    if is_tokenq_checkpoint(name):
        return TokenQModel.from_pretrained(name).eval(), True
    return policy_model(AutoModelForCausalLM.from_pretrained(name)), False


def load_critic(name: str, policy: TokenQModel, policy_tokenizer) -> TokenQModel:
    """A tokenq checkpoint as the critic steering `policy` (`tokenq.generate(..., critic=)`), on the policy's device;
    refused, naming both, when their vocabularies or tokenizers differ."""
    critic = TokenQModel.from_pretrained(name).eval().to(policy.unembed.device)
    check_same_vocabulary(policy.backbone, critic, policy_tokenizer, load_tokenizer(name))
    return critic


def text_prompts(rows) -> list[str]:
    """The distinct text prompts of `rows`, in order (where collection and a search start; message-list prompts are
    left out)."""
    column = rows["prompt"] if "prompt" in rows.column_names else []
    return list(dict.fromkeys(p for p in column if isinstance(p, str)))


def policy_model(backbone) -> TokenQModel:
    """A plain causal LM as a `TokenQModel` for `tokenq.generate` with `beta=0` (plain decoding, heads unread)."""
    return TokenQModel(backbone.eval(), TokenQConfig()).eval()


def rows_of(task, prompts: list[str], completions: list[str], scores: dict[str, list[float]], provenance: dict,
            originals=None) -> list[dict]:
    """Scored completions as data rows: process rows (`steps`, `step_rewards`, outcome `reward`) when the task has
    `process_rewards`, else outcome rows (`completion`, `reward`); conversational prompts (`originals` maps a
    rendered prompt to its message list) get the completion as an assistant message; provenance columns last."""
    originals = originals or {}
    process = task.process_rewards(prompts, completions) if hasattr(task, "process_rewards") else None
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        original = originals.get(prompt, prompt)
        row = {"prompt": original}
        if process is not None:
            row.update(steps=process[i]["steps"], step_rewards=process[i]["step_rewards"])
        elif isinstance(original, list):
            row["completion"] = [{"role": "assistant", "content": completion}]
        else:
            row["completion"] = completion
        rows.append({**row, "reward": scores["reward"][i], **provenance})
    return rows


def collect(model: TokenQModel, tokenizer, task, prompts: list[str], *, num_samples: int, seed: int = 0,
            batch_size: int = 64, provenance: dict | None = None, originals=None, **generate_kwargs) -> tuple[list[dict], dict]:
    """Complete each of `prompts` (rendered text) `num_samples` times with `tokenq.evaluation.complete` (any
    strategy: `generate_kwargs`), score with `task.score`, and return (rows, stats) on every process: the rows in
    prompt order (`rows_of`), and `generated_tokens` / `forward_rows` per completion (means). Under several
    processes each decodes its share of the chunks (see the module docstring) and all receive all rows."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    items = [p for p in prompts for _ in range(num_samples)]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    state = process_state()
    special = getattr(task, "prompt_add_special_tokens", True)
    max_new_tokens = generate_kwargs.pop("max_new_tokens", None) or task.max_new_tokens
    done = []
    for c in range(state.process_index, len(chunks), state.num_processes):
        set_seed(seed + c)  # a chunk's samples do not depend on the process that draws them
        completions, stats = complete(model, tokenizer, chunks[c], max_new_tokens, batch_size=batch_size,
                                      add_special_tokens=special, **generate_kwargs)
        scores = checked_scores(task, chunks[c], completions)
        done.append((c, rows_of(task, chunks[c], completions, scores, provenance or {}, originals),
                     stats["generated_tokens"].tolist(), stats["forward_passes"].tolist()))
    if state.num_processes > 1:
        done = gather_object(done)
    done.sort(key=lambda chunk: chunk[0])
    rows = [row for _, chunk_rows, _, _ in done for row in chunk_rows]
    tokens = [t for _, _, chunk_tokens, _ in done for t in chunk_tokens]
    forward = [f for _, _, _, chunk_forward in done for f in chunk_forward]
    return rows, {"generated_tokens": sum(tokens) / max(1, len(tokens)), "forward_rows": sum(forward) / max(1, len(forward))}


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """`rows` as JSON lines at `path` (whole or absent); `tokenq.data.load_rows` and every recipe read it back."""
    path = Path(path)
    replace_file(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return path
