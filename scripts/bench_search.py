"""Compute of the search strategies, side by side with best-of-N in one run: generated tokens, forward rows and
forward rows per generated token, and for A* / MCTS the same search without the shared-prefix cache.

    python scripts/bench_search.py [--budget 16] [--json bench_search.json]

A Llama-shaped model from a config (4 layers, hidden 256, vocabulary 32,000) with tokenq's default heads, batch 8,
prompt 32, 64 new tokens (EOS disabled: every candidate runs to the end), steps of 8 tokens, pi_beta's top-k 50;
every strategy at budget N (`--budget`): best_of_n and dvts N candidates (dvts in N / 4 subtrees), step_search N
continuations per step, astar / mcts N completions' tokens with 4 continuations per expansion. Per strategy:
- rows_per_token: forward rows / generated tokens (a prompt prefill is one row, each sampled token of each
  candidate one, idle rows of a batched step included)                                     [<= 1.05]
- astar / mcts: positions_per_token, the positions run through the backbone (each forward's rows x their lengths:
  prompts once, then one per token) per generated token, with the shared-prefix cache and when every expanded node
  re-runs its prompt and tokens (recompute_positions_per_token: a search without a prefix cache, as search-and-learn
  without vLLM's prefix caching; the same sequences, tests/test_tree_search.py); the forward-row and wall-time ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from tokenq import TokenQConfig, TokenQModel, generate
from tokenq.guidance import Guide
from tokenq.search import CandidateSearch
from tokenq.steering import Steering
from tokenq.tree_rows import tree_search

BATCH, PROMPT, NEW, STEP, WIDTH, VOCAB = 8, 32, 64, 8, 4, 32000
FILTER = dict(top_k=50)


def build() -> tuple[TokenQModel, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=PROMPT + NEW + 8)
    model = TokenQModel(LlamaForCausalLM(config), TokenQConfig()).eval()
    return model, torch.randint(0, VOCAB, (BATCH, PROMPT))


def strategies(budget: int) -> dict[str, dict]:
    steps = {"step_tokens": STEP}
    return {
        "best_of_n": {"num_candidates": budget},
        "step_search": {"num_continuations": budget, **steps},
        "dvts": {"num_candidates": budget, "num_continuations": WIDTH, **steps},
        "astar": {"num_candidates": budget, "num_continuations": WIDTH, **steps},
        "mcts": {"num_candidates": budget, "num_continuations": WIDTH, **steps},
    }


def run_strategy(model, prompts, strategy: str, knobs: dict) -> dict:
    set_seed(0)
    start = time.perf_counter()
    out = generate(model, prompts, strategy=strategy, beta=0.0, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                   **knobs, **FILTER)
    seconds = time.perf_counter() - start
    tokens, rows = out.generated_tokens.float().mean().item(), out.forward_passes.float().mean().item()
    return {"tokens_per_prompt": tokens, "forward_rows_per_prompt": rows, "rows_per_token": rows / tokens, "seconds": seconds}


def run_tree(model, prompts, strategy: str, budget: int, recompute: bool) -> dict:
    """Forward rows per prompt, positions run through the backbone (rows x their lengths) and seconds of
    tokenq.tree_rows.tree_search, with or without the shared cache."""
    steering = Steering.of(model, None)
    search = CandidateSearch(steering, Guide(model, 0.0, "sample", 1.0, FILTER["top_k"], None), max_new_tokens=NEW,
                             eos_token_ids=[], pad_token_id=0)
    positions = []
    hook = model.backbone.register_forward_pre_hook(lambda m, a, kw: positions.append(kw["input_ids"].numel()), with_kwargs=True)
    set_seed(0)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            tree_search(search, strategy, prompts, torch.ones_like(prompts), budget, WIDTH, step_tokens=STEP, recompute=recompute)
    finally:
        hook.remove()
    return {"rows": search.forward_rows.float().mean().item(), "positions": sum(positions) / BATCH,
            "tokens": search.spent_tokens.float().mean().item(), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    model, prompts = build()
    results = {}
    print(f"budget N = {args.budget}; batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, steps of {STEP} tokens")
    print("| strategy | tokens / prompt | forward rows / prompt | rows per token | seconds |\n|---|---:|---:|---:|---:|")
    for strategy, knobs in strategies(args.budget).items():
        r = results[strategy] = run_strategy(model, prompts, strategy, knobs)
        print(f"| {strategy} | {r['tokens_per_prompt']:.1f} | {r['forward_rows_per_prompt']:.1f} | {r['rows_per_token']:.3f} "
              f"| {r['seconds']:.2f} |", flush=True)
    for strategy in ("astar", "mcts"):
        shared = run_tree(model, prompts, strategy, args.budget, recompute=False)
        again = run_tree(model, prompts, strategy, args.budget, recompute=True)
        results[strategy] |= {"recompute_rows_ratio": again["rows"] / shared["rows"],
                              "positions_per_token": shared["positions"] / shared["tokens"],
                              "recompute_positions_per_token": again["positions"] / again["tokens"],
                              "recompute_time_ratio": again["seconds"] / shared["seconds"]}
        r = results[strategy]
        print(f"{strategy}: backbone positions per generated token {r['positions_per_token']:.2f} with the shared-prefix "
              f"cache, {r['recompute_positions_per_token']:.2f} when every expanded node re-runs its prompt and tokens; "
              f"forward rows {r['recompute_rows_ratio']:.2f}x, time {r['recompute_time_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
