"""One short training run of a tiny model on fixed rows of different lengths, as 1 or N processes: what
tests/test_distributed.py and scripts/bench_scale.py launch and compare.

    python scripts/scale_run.py --out runs/one --per_device_batch 8
    accelerate launch --config_file configs/accelerate/ddp_cpu_2proc.yaml scripts/scale_run.py --out runs/two --per_device_batch 4

Every process writes `rank{r}.json` (world size, rank, optimiser steps, tokens/s, peak RSS, the trainer's
log history, how many checkpoint writes it made) and `rank{r}.safetensors` (its full weights at the end,
gathered if sharded) to `--out`; the trainer's own output (checkpoints) goes to `--out/run`.
"""

from __future__ import annotations

import argparse
import json
import resource
import string
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import tokenq.checkpoint  # noqa: E402
from tokenq import IQLConfig, IQLTrainer, TokenQConfig, TokenQModel  # noqa: E402
from tokenq.tasks import build_char_tokenizer  # noqa: E402


def rows(n: int) -> list[dict]:
    """Rows whose action counts differ a lot (1 to 24 tokens), so that no split of a batch balances them."""
    letters = string.ascii_lowercase
    return [{"prompt": letters[i % 7 : i % 7 + 1 + i % 3], "completion": (letters * 2)[i % 26 : i % 26 + 1 + (i * 7) % 24],
             "reward": float(i % 3 == 0)} for i in range(n)]


def tiny_tokenizer():
    return build_char_tokenizer(list(string.ascii_lowercase + " "), special_tokens=[])


def tiny_model(vocab_size: int, n_layer: int = 2, n_embd: int = 32) -> TokenQModel:
    set_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_layer=n_layer, n_embd=n_embd, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return TokenQModel(GPT2LMHeadModel(config), TokenQConfig(q_rank=8))


def training_args(out: Path, per_device_batch: int, steps: int, save_steps: int = 0) -> IQLConfig:
    return IQLConfig(
        output_dir=str(out / "run"), report_to="none", per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        disable_tqdm=True, seed=0, dataloader_pin_memory=False, target_update_alpha=0.5, target_update_interval=1,
        max_length=64,
    )


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--per_device_batch", type=int, default=8)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=32)
    p.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: only the final save)")
    p.add_argument("--resume", default=None, help="resume_from_checkpoint (a path, or 'true')")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    out = Path(args.out)
    writes = []
    move = tokenq.checkpoint._move_into_place  # count the checkpoint writes of this process
    tokenq.checkpoint._move_into_place = lambda tmp, target: (writes.append(str(target)), move(tmp, target))[1]

    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), args.n_layer, args.n_embd)
    data = rows(args.steps * args.global_batch)
    train_args = training_args(out, args.per_device_batch, args.steps, args.save_steps)
    trainer = IQLTrainer(model, train_args, Dataset.from_list(data), tokenizer)
    if train_args.world_size * args.per_device_batch != args.global_batch:
        raise SystemExit(f"{train_args.world_size} processes x {args.per_device_batch} != global batch {args.global_batch}")
    start = time.perf_counter()
    resume = args.resume if args.resume not in ("true", "True") else True
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model(str(out / "run"))

    rank = trainer.args.process_index
    state = trainer.accelerator.get_state_dict(trainer.model)  # full tensors, gathered if sharded
    tokens = sum(len(tokenizer(r["prompt"] + r["completion"]).input_ids) + 1 for r in data)
    out.mkdir(parents=True, exist_ok=True)
    if state is not None:
        save_file({k: v.detach().cpu().clone() for k, v in state.items()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": trainer.args.world_size,
        "dist_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "rank": rank,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,  # the rows are exactly one pass of `steps` global batches
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "log_history": trainer.state.log_history,
        "checkpoint_writes": writes,
        "wrapped_by": type(trainer.model_wrapped).__name__,
    }, indent=1))


if __name__ == "__main__":
    main()
