"""What the divergence guard costs: `IQLTrainer.train` steps with `DivergenceGuard` against the same steps without
it, side by side in one process (alternating runs), on a 4-layer 256-wide GPT-2 at a real vocabulary.

    python scripts/bench_guard.py                       # vocab 50257, batch 8 x 128, 3 pairs of 10-step runs
    python scripts/bench_guard.py --vocab 151936 --pairs 2

The guard reads every gradient once per optimiser step (one finiteness reduction per tensor) and the step's
recorded loss terms. Prints the median step time of each and their ratio (target: <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from tokenq import IQLConfig, IQLTrainer, TokenQConfig, TokenQModel
from tokenq.tasks import build_char_tokenizer
from tokenq.trainers.guard import DivergenceGuard


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


class KeepTerms(TrainerCallback):
    """Without the guard, each step's terms still go to the log (what the guard does with a finite step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.keep_step(True)


def run(vocab: int, batch: int, length: int, steps: int, guard: bool) -> float:
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer(list("abcdefghij"))
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_layer=4, n_embd=256, n_head=4, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0)
    model = TokenQModel(GPT2LMHeadModel(config), TokenQConfig())
    half = length // 2
    rows = [{"input_ids": torch.randint(2, vocab, (length,)).tolist(), "attention_mask": [1] * length,
             "action_mask": [0] * half + [1] * half, "rewards": [0.0] * (length - 1) + [1.0], "terminated": True,
             "truncated": False} for _ in range(batch * (steps + 1))]
    with tempfile.TemporaryDirectory() as out:
        args = IQLConfig(output_dir=out, report_to="none", use_cpu=True, max_steps=steps + 1, per_device_train_batch_size=batch,
                         save_strategy="no", disable_tqdm=True, logging_steps=1000, dataloader_pin_memory=False)
        trainer = IQLTrainer(model, args, Dataset.from_list(rows), tokenizer)
        if not guard:
            trainer.pop_callback(DivergenceGuard)
            trainer.add_callback(KeepTerms(trainer))
        times = StepTimes()
        trainer.add_callback(times)
        trainer.train()
    return statistics.median(times.times[1:])  # the first step warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args()
    with_guard, without = [], []
    for _ in range(args.pairs):
        without.append(run(args.vocab, args.batch, args.length, args.steps, guard=False))
        with_guard.append(run(args.vocab, args.batch, args.length, args.steps, guard=True))
    a, b = statistics.median(with_guard), statistics.median(without)
    print(f"vocab {args.vocab}, batch {args.batch}x{args.length}: step with the guard {a * 1000:.1f} ms, without "
          f"{b * 1000:.1f} ms, ratio {a / b:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
