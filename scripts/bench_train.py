"""Training-step cost of IQL against a plain LM training step, side by side, at real vocabulary sizes.

    python scripts/bench_train.py --json outputs/bench_train.json                  # vocab 50257 and 151936, 8x128 and 8x512
    python scripts/bench_train.py --vocabs 50257 --shapes 8x128 --repeats 3        # quicker
    python scripts/bench_train.py --vocabs 151936 --shapes 8x128 --profile iql frozen   # + where the time goes

A 4-layer 256-wide GPT-2 (fp32), one batch of random tokens whose second half are actions. Variants, each in
its own subprocess (so that its peak RSS is its own): `lm` (cross-entropy on every token, backward, AdamW
step), `iql` (IQLTrainer.compute_loss: twin low-rank Q heads, V, CQL over the vocabulary, BC; backward,
AdamW step), `iql_mlp` (trlx-style MLP Q heads, reference row), `frozen` (frozen backbone, heads only) and
`forward` (a no-grad forward of the backbone). Times are medians over `--repeats` steps after one warm-up
step; memory is the peak RSS of the process minus its RSS before the first step. Targets (issue 12):
iql / lm time <= 1.3 and peak memory <= 1.25 at 151,936; frozen / forward time <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tokenq.reporting import write_json

VARIANTS = ("lm", "iql", "iql_mlp", "frozen", "forward")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(variant: str, vocab: int, batch: int, length: int, repeats: int, profile: int = 0) -> dict:
    """One variant in this process: median step seconds, tokens/s, peak extra memory. `profile` > 0: print
    torch.profiler's `profile` most expensive ops (CPU time, own time) of one step after the warm-up."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenq import IQLConfig, IQLTrainer, TokenQConfig, TokenQModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_layer=4, n_embd=256, n_head=4)
    backbone = GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    action = torch.zeros_like(ids)
    action[:, length // 2 : -1] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "action_mask": action,
              "rewards": torch.zeros(batch, length), "terminated": torch.ones(batch, dtype=torch.bool)}
    inputs["rewards"][:, -2] = 1.0
    if variant == "forward":
        backbone.eval()
        step = lambda: backbone(input_ids=ids, attention_mask=mask, use_cache=False)  # noqa: E731
        grad = torch.no_grad
    else:
        if variant == "lm":
            model = backbone
            loss_fn = lambda: model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss  # noqa: E731
        else:
            heads = TokenQConfig(q_head="mlp" if variant == "iql_mlp" else "low_rank", freeze_backbone=variant == "frozen")
            model = TokenQModel(backbone, heads)
            args = IQLConfig(output_dir="/tmp/bench_train", report_to="none", use_cpu=True, max_steps=1)
            trainer = IQLTrainer(model, args, _tiny_dataset(), _tokenizer())
            loss_fn = lambda: trainer.compute_loss(model, inputs)  # noqa: E731
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        grad = torch.enable_grad
    base = _rss_mb()
    times = []
    with grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            step()
            if i:  # the first step warms up (allocations, optimizer state)
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if profile:
        with grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile), file=sys.stderr)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_s": batch * length / seconds, "peak_extra_mb": peak - base}


def _tiny_dataset():
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    return Dataset.from_list([{"prompt": "a", "completion": "b", "reward": 1.0}])


def _tokenizer():
    from tokenq.tasks import build_char_tokenizer

    return build_char_tokenizer(list("ab"))


def run_variant(variant: str, vocab: int, shape: str, repeats: int, profile: int = 0) -> dict:
    batch, length = (int(x) for x in shape.split("x"))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench_train import measure; "
            "print('RESULT', json.dumps(measure(sys.argv[2], *map(int, sys.argv[3:]))))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), variant, str(vocab), str(batch),
                           str(length), str(repeats), str(profile)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.split("RESULT", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[50257, 151936])
    p.add_argument("--shapes", nargs="+", default=["8x128", "8x512"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", nargs="+", default=[], metavar="VARIANT",
                   help="print the top ops of one step of these variants (torch.profiler), then measure as usual")
    p.add_argument("--profile_rows", type=int, default=15)
    args = p.parse_args()
    result: dict[str, dict] = {}
    for vocab in args.vocabs:
        for shape in args.shapes:
            r = {v: run_variant(v, vocab, shape, args.repeats, args.profile_rows if v in args.profile else 0)
                 for v in VARIANTS}
            summary = {
                "iql_vs_lm_time": r["iql"]["seconds"] / r["lm"]["seconds"],
                "iql_vs_lm_peak_memory": r["iql"]["peak_extra_mb"] / r["lm"]["peak_extra_mb"],
                "frozen_vs_forward_time": r["frozen"]["seconds"] / r["forward"]["seconds"],
                "iql_mlp_vs_lm_time": r["iql_mlp"]["seconds"] / r["lm"]["seconds"],
                **{f"{v}_tokens_per_s": r[v]["tokens_per_s"] for v in VARIANTS},
                **{f"{v}_peak_extra_mb": r[v]["peak_extra_mb"] for v in VARIANTS},
            }
            print(f"vocab {vocab:6d} batch {shape}: iql/lm time {summary['iql_vs_lm_time']:.2f}, "
                  f"peak memory {summary['iql_vs_lm_peak_memory']:.2f}; frozen/forward time "
                  f"{summary['frozen_vs_forward_time']:.2f}; mlp-head iql/lm time {summary['iql_mlp_vs_lm_time']:.2f}", flush=True)
            result.setdefault(str(vocab), {})[shape] = summary
    for vocab, shapes in result.items():  # the keys: the 8x512 figures at the top level of each vocab
        shapes.update({k: v for k, v in shapes.get("8x512", {}).items() if k.endswith(("_time", "_memory"))})
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
