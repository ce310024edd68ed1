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
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM, set_seed

from tokenq.atomic import replace_file
from tokenq.checkpoint import CONFIG_FILE
from tokenq.data import load_tokenizer
from tokenq.evaluation import complete, generated_ids
from tokenq.generation import generate
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.steering import check_same_vocabulary
from tokenq.tasks.protocol import checked_scores

logger = logging.getLogger(__name__)


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
            originals=None, outcome: bool = False, truncated: list[bool] | None = None) -> list[dict]:
    """Scored completions as data rows: process rows (`steps`, `step_rewards`, outcome `reward`) when the task has
    `process_rewards` (unless `outcome`), else outcome rows (`completion`, `reward`); conversational prompts
    (`originals` maps a rendered prompt to its message list) get the completion as an assistant message; `truncated`
    (per completion: cut at the budget, no EOS) marks an episode that did not end; provenance columns last.
    `completions` are the texts to train on (`exact_texts`: special tokens kept); `scores` were computed on the texts
    a reward function reads."""
    originals = originals or {}
    process = task.process_rewards(prompts, completions) if hasattr(task, "process_rewards") and not outcome else None
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
        rows.append({**row, "reward": scores["reward"][i], "truncated": bool(truncated[i]) if truncated else False,
                     **provenance})
    return rows


def exact_texts(tokenizer, token_ids: list[list[int]]) -> list[str]:
    """Completions as training text: each one's generated tokens decoded with their special tokens (its EOS is not in
    `token_ids`: training appends it to a row that is not `truncated`), so that training tokenizes the tokens that were
    generated. A tokenizer whose text round trip is not exact (some BPE merges) is reported, with the rows' count."""
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids]
    changed = sum(tokenizer(t, add_special_tokens=False).input_ids != ids for t, ids in zip(texts, token_ids))
    if changed:
        logger.warning("%d of %d collected completions re-tokenize to other tokens than were generated (this tokenizer's "
                       "decode / encode round trip is not exact): training reads the re-tokenized text", changed, len(texts))
    return texts


def collect(model: TokenQModel, tokenizer, task, prompts: list[str], *, num_samples: int, seed: int = 0,
            batch_size: int = 64, provenance: dict | None = None, originals=None, outcome_rows: bool = False,
            rollin: dict | None = None, **generate_kwargs) -> tuple[list[dict], dict]:
    """Complete each of `prompts` (rendered text) `num_samples` times with `tokenq.evaluation.complete` (any
    strategy: `generate_kwargs`), score with `task.score`, and return (rows, stats) on every process: the rows in
    prompt order (`rows_of`; outcome rows only with `outcome_rows`), and `generated_tokens` / `forward_rows` per
    completion (means). `rollin={"critic": C, "beta": b}`: Q♯'s roll-in / roll-out instead (`rollin_rows`). Under
    several processes each decodes its share of the chunks (see the module docstring) and all receive all rows."""
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
        if rollin is None:
            completions, stats = complete(model, tokenizer, chunks[c], max_new_tokens, batch_size=batch_size,
                                          add_special_tokens=special, **generate_kwargs)
            scores = checked_scores(task, chunks[c], completions)
            chunk_rows = rows_of(task, chunks[c], exact_texts(tokenizer, stats["token_ids"]), scores, provenance or {},
                                 originals, outcome=outcome_rows, truncated=stats["truncated"].tolist())
        else:
            chunk_rows, stats = rollin_rows(model, tokenizer, task, chunks[c], max_new_tokens, rollin, special,
                                            provenance or {}, temperature=generate_kwargs.get("temperature", 1.0))
        done.append((c, chunk_rows, stats["generated_tokens"].tolist(), stats["forward_passes"].tolist()))
    if state.num_processes > 1:
        done = gather_object(done)
    done.sort(key=lambda chunk: chunk[0])
    rows = [row for _, chunk_rows, _, _ in done for row in chunk_rows]
    tokens = [t for _, _, chunk_tokens, _ in done for t in chunk_tokens]
    forward = [f for _, _, _, chunk_forward in done for f in chunk_forward]
    return rows, {"generated_tokens": sum(tokens) / max(1, len(tokens)), "forward_rows": sum(forward) / max(1, len(forward))}


def rollin_rows(model: TokenQModel, tokenizer, task, prompts: list[str], max_new_tokens: int, rollin: dict,
                add_special_tokens: bool, provenance: dict, temperature: float = 1.0) -> tuple[list[dict], dict]:
    """Q♯'s data collection (Zhou et al. 2025, arXiv:2502.20548): each prompt is rolled in for h ~ U{0, ..., max_new_tokens
    - 1} tokens by the policy (`model`'s LM) steered by `rollin["critic"]` at `rollin["beta"]`, then rolled out to the
    end by the policy alone. The row's prompt is the prompt followed by the roll-in text and its completion the
    roll-out, so training reads only returns under the policy; the reward scores the whole completion. A row whose
    roll-in already ended (EOS) has no roll-out and is dropped. Outcome rows; stats per kept row."""
    device, eos, pad = model.unembed.device, tokenizer.eos_token_id, tokenizer.pad_token_id
    common = {"strategy": "sample", "temperature": temperature, "eos_token_id": eos, "pad_token_id": pad}
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens)
    enc = enc.to(device)
    switch = torch.randint(0, max_new_tokens, (len(prompts),)).tolist()
    prefixes, spent = [[] for _ in prompts], torch.zeros(len(prompts))
    if max(switch) > 0:
        rolled = generate(model, enc.input_ids, enc.attention_mask, critic=rollin["critic"], beta=rollin["beta"],
                          max_new_tokens=max(switch), **common)
        prefixes = [row[:h] for row, h in zip(rolled.sequences[:, enc.input_ids.shape[1]:].tolist(), switch)]
        spent += rolled.forward_passes.float()
    keep = [i for i, prefix in enumerate(prefixes) if eos not in prefix]
    if not keep:
        return [], {"generated_tokens": np.zeros(0), "forward_passes": np.zeros(0)}
    ids = [enc.input_ids[i][enc.attention_mask[i].bool()].tolist() + prefixes[i] for i in keep]
    batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(device)
    out = generate(model, batch.input_ids, batch.attention_mask, beta=0.0, max_new_tokens=max_new_tokens - min(switch[i] for i in keep),
                   **common)
    rollouts, ended = [], []
    for row, i in zip(out.sequences[:, batch.input_ids.shape[1]:].tolist(), keep):
        ids, finished = generated_ids(row[: max_new_tokens - switch[i]], eos)
        rollouts.append(ids)
        ended.append(finished)
    clean = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731  the text a reward function reads
    kept_prompts = [prompts[i] for i in keep]
    scores = checked_scores(task, kept_prompts, [clean(prefixes[i] + r) for i, r in zip(keep, rollouts)])
    roll_ins, roll_outs = exact_texts(tokenizer, [prefixes[i] for i in keep]), exact_texts(tokenizer, rollouts)
    rows = [{"prompt": p + roll_in, "completion": roll_out, "reward": reward, "truncated": not finished, **provenance}
            for p, roll_in, roll_out, reward, finished in zip(kept_prompts, roll_ins, roll_outs, scores["reward"], ended)]
    generated = np.asarray([len(prefixes[i]) + len(r) + f for i, r, f in zip(keep, rollouts, ended)], dtype=float)
    return rows, {"generated_tokens": generated, "forward_passes": (spent[keep] + out.forward_passes.float()).numpy()}


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """`rows` as JSON lines at `path` (whole or absent); `tokenq.data.load_rows` and every recipe read it back."""
    path = Path(path)
    replace_file(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return path
