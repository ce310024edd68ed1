"""tokenq's sharded-training paths under torch FSDP2 (`fully_shard`) on CPU processes (gloo).

accelerate's FSDP plugin needs a GPU-type backend: on CPU it falls back to DDP (checked: the Trainer's
model comes out wrapped in `DistributedDataParallel`). This is the thinnest honest wrapper instead: torch's
own `fully_shard` on every decoder block and on the root (embeddings, LM head, V / Q / target-Q heads), an
AdamW loop around tokenq's own pieces (`IQLTrainer.compute_loss` with the global action count, Polyak
updates on the sharded heads, `save_pretrained(state_dict=...)` from the gathered state dict, and
`load_checkpoint_weights` into a sharded model to resume) — what Trainer + accelerate call on a GPU.

    torchrun --nproc_per_node 2 scripts/fsdp2_cpu.py --out runs/fsdp2            # 2 shards
    torchrun --nproc_per_node 2 scripts/fsdp2_cpu.py --out runs/resumed --resume runs/fsdp2/ckpt --steps 1

Writes `rank{r}.json` (world size, sharded parameters, log) and, from rank 0, `gathered.safetensors`
(the full state dict after training) and `ckpt/` (a tokenq checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_run import rows, tiny_model, tiny_tokenizer, training_args  # noqa: E402

from tokenq import IQLTrainer  # noqa: E402


def shard(model, world: int) -> int:
    """fully_shard each decoder block, then the root; returns how many parameters are sharded DTensors."""
    mesh = init_device_mesh("cpu", (world,))
    for block in model.backbone.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sum(isinstance(p, DTensor) for p in model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--resume", default=None, help="a tokenq checkpoint to restore into the sharded model first")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    sharded = shard(model, world)
    if args.resume:
        model.load_checkpoint_weights(args.resume)
        restored = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({k: v.clone() for k, v in restored.items()}, out / "restored.safetensors")
    train_args = training_args(out, args.global_batch // world, args.steps)
    trainer = IQLTrainer(model, train_args, Dataset.from_list(rows(args.steps * args.global_batch)), tokenizer)
    batches = iter(trainer.get_train_dataloader())  # accelerate shards the batches across processes, as in DDP
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(train_args.adam_beta1, train_args.adam_beta2), eps=train_args.adam_epsilon)
    log = []
    model.train()
    for step in range(args.steps):
        batch = next(batches)
        num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over processes
        torch.nn.utils.clip_grad_norm_(params, train_args.max_grad_norm)  # as Trainer does (DTensor-aware)
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % train_args.target_update_interval == 0:  # Polyak on the sharded heads, on the callback's schedule
            model.update_targets(train_args.target_update_alpha)
        total = loss.detach().clone() / world
        dist.all_reduce(total)
        log.append(total.item())

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: v.clone() for k, v in full.items()}, out / "gathered.safetensors")
        model.save_pretrained(out / "ckpt", tokenizer=tokenizer, state_dict=full)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": world, "rank": rank, "sharded_params": sharded,
        "params": sum(1 for _ in model.parameters()), "loss": log,
        "local_numel": sum(q.to_local().numel() if isinstance(q, DTensor) else q.numel() for q in model.parameters()),
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
