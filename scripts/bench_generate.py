"""Guided decoding vs plain HF `generate`, measured side by side in one run (interleaved repeats, medians).

    python scripts/bench_generate.py [--repeats 8] [--json bench.json]

Each pair is timed in alternating order (ABBA: use an even count). A Llama-shaped model from a config
(4 layers, hidden 256) with tokenq's default heads, for vocabularies 32,000 and 50,257; batch 8,
prompt 32, 128 new tokens (EOS disabled, so every call makes 128 tokens); pi_beta's filter top-k 50,
top-p 0.95 for sampling. Ratios (targets in brackets):
- guided_vs_plain_sampling_tps: guided sampling tokens/s / HF sampling tokens/s             [>= 0.95]
- guided_beam_vs_hf_beam_time: guided beam search (4 beams) / HF beam search (4 beams)      [<= 1.10]
- best_of_n_vs_plain_time: best-of-8 / HF sampling of the same 8 x batch samples            [<= 1.05]
- guided_vs_plain_peak_mem: peak resident memory of a process doing guided sampling / plain  [<= 1.10]
  (each in a fresh process; the peak memory *added* by decoding is reported beside it)
- critic_vs_plain_sampling_tps: the same policy (as a plain HF LM) steered by a separate critic, a `TokenQModel`
  on a Llama backbone 4.3-4.5x smaller than the policy (2 layers, hidden 128, tied embeddings; its own KV cache and
  forward per token; with tokenq's default heads, whose rank-32 token embeddings weigh about as much as this small
  backbone at these vocabularies, the critic is 2.2-2.3x smaller) / HF sampling of the policy, tokens/s  [>= 0.75]
- critic_peak_mem_vs_budget: peak memory steering with the critic / (1.10 x plain + the critic's weights)  [<= 1.00]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from tokenq import TokenQConfig, TokenQModel, generate

BATCH, PROMPT, NEW, N = 8, 32, 128, 8
FILTER = dict(top_k=50, top_p=0.95)


def build(vocab: int) -> tuple[TokenQModel, torch.Tensor]:
    set_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = TokenQModel(LlamaForCausalLM(config), TokenQConfig()).eval()
    prompts = torch.randint(3, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    return model, prompts


def build_critic(vocab: int) -> TokenQModel:
    """The critic: a Llama about a quarter of the policy's size, with tokenq's default heads."""
    set_seed(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)
    return TokenQModel(LlamaForCausalLM(config), TokenQConfig()).eval()


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_mib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def variants(model: TokenQModel, prompts: torch.Tensor, critic: TokenQModel | None = None) -> dict:
    hf, kw = model.backbone.generate, dict(max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    mask = torch.ones_like(prompts)
    return {
        "critic_sample": lambda: generate(model.backbone, prompts, mask, critic=critic, strategy="sample", beta=1.0, **FILTER, **kw),
        "plain_sample": lambda: hf(prompts, attention_mask=mask, do_sample=True, **FILTER, **kw),
        "guided_sample": lambda: generate(model, prompts, mask, strategy="sample", beta=1.0, **FILTER, **kw),
        "hf_beam": lambda: hf(prompts, attention_mask=mask, do_sample=False, num_beams=4, **kw),
        "guided_beam": lambda: generate(model, prompts, mask, num_beams=4, beta=1.0, **kw),
        "plain_n_samples": lambda: hf(prompts, attention_mask=mask, do_sample=True, num_return_sequences=N, **FILTER, **kw),
        "best_of_n": lambda: generate(model, prompts, mask, strategy="best_of_n", num_candidates=N, beta=0.0, **FILTER, **kw),
    }


PAIRS = (("plain_sample", "guided_sample"), ("hf_beam", "guided_beam"), ("plain_n_samples", "best_of_n"),
         ("plain_sample", "critic_sample"))


def time_all(vocab: int, repeats: int) -> dict[str, float]:
    """Median seconds per variant. Each pair is timed on its own, interleaved (machine noise hits both
    alike) in alternating order (A B B A ...): on this machine a call measured up to ~5% slower after
    another one, and slower still after a memory-heavy one, so each variant must follow the same calls."""
    model, prompts = build(vocab)
    runs = variants(model, prompts, build_critic(vocab))
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for pair in PAIRS:
            for name in pair:  # warm-up
                runs[name]()
            for r in range(repeats):
                for name in pair[:: 1 if r % 2 == 0 else -1]:
                    start = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_memory_child(vocab: int, name: str) -> None:
    """In a fresh process: build, warm up, reset the peak-RSS counter, decode once, print peak (KiB)."""
    model, prompts = build(vocab)
    fn = variants(model, prompts, build_critic(vocab) if name == "critic_sample" else None)[name]
    with torch.no_grad():
        fn()
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        before = _rss_kb()
        fn()
    print(json.dumps({"peak_kb": _hwm_kb(), "added_kb": _hwm_kb() - before}))


def peak_memory(vocab: int, name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--vocab", str(vocab)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(vocab: int, repeats: int) -> dict[str, float]:
    t = time_all(vocab, repeats)
    mem = {name: [] for name in ("plain_sample", "guided_sample", "critic_sample")}
    for _ in range(3):  # interleaved fresh processes, medians
        for name in mem:
            mem[name].append(peak_memory(vocab, name))
    peak = {k: statistics.median(m["peak_kb"] for m in v) for k, v in mem.items()}
    added = {k: statistics.median(m["added_kb"] for m in v) for k, v in mem.items()}
    tokens = BATCH * NEW
    policy, critic = build(vocab)[0].backbone, build_critic(vocab)
    critic_mib = weights_mib(critic)
    return {
        "critic_vs_plain_sampling_tps": (tokens / t["critic_sample"]) / (tokens / t["plain_sample"]),
        "critic_peak_mem_vs_budget": (peak["critic_sample"] / 1024) / (1.10 * peak["plain_sample"] / 1024 + critic_mib),
        "policy_vs_critic_backbone_parameters": count(policy) / count(critic.backbone),
        "policy_vs_critic_parameters_with_heads": count(policy) / count(critic),
        "critic_weights_mib": critic_mib,
        "guided_vs_plain_sampling_tps": (tokens / t["guided_sample"]) / (tokens / t["plain_sample"]),
        "guided_beam_vs_hf_beam_time": t["guided_beam"] / t["hf_beam"],
        "best_of_n_vs_plain_time": t["best_of_n"] / t["plain_n_samples"],
        "guided_vs_plain_peak_mem": peak["guided_sample"] / peak["plain_sample"],
        "peak_mem_mib": {k: v / 1024 for k, v in peak.items()},
        "decoding_added_mem_mib": {k: v / 1024 for k, v in added.items()},
        "seconds": t,
        "plain_sampling_tokens_per_s": tokens / t["plain_sample"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return peak_memory_child(args.vocab[0], args.memory_child)
    results = {}
    for vocab in args.vocab:
        results[str(vocab)] = r = measure(vocab, args.repeats)
        print(f"vocab {vocab}: guided/plain sampling tokens/s {r['guided_vs_plain_sampling_tps']:.3f} (>= 0.95) | "
              f"guided/HF beam time {r['guided_beam_vs_hf_beam_time']:.3f} (<= 1.10) | "
              f"best-of-{N}/plain time {r['best_of_n_vs_plain_time']:.3f} (<= 1.05) | "
              f"peak memory guided/plain {r['guided_vs_plain_peak_mem']:.3f} (<= 1.10; decoding adds "
              f"{r['decoding_added_mem_mib']['guided_sample']:.1f} vs {r['decoding_added_mem_mib']['plain_sample']:.1f} MiB)",
              flush=True)
        print(f"vocab {vocab}: critic (backbone {r['policy_vs_critic_backbone_parameters']:.1f}x smaller than the policy, "
              f"{r['policy_vs_critic_parameters_with_heads']:.1f}x with its heads) steering / plain sampling tokens/s "
              f"{r['critic_vs_plain_sampling_tps']:.3f} (>= 0.75) | peak memory / (1.10 x plain + critic "
              f"{r['critic_weights_mib']:.0f} MiB) {r['critic_peak_mem_vs_budget']:.3f} (<= 1.00)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
