"""Candidate search with a shared KV cache: best-of-N, softmax resampling, step-level value search.

HF `generate` cannot fork candidates from one prompt cache, nor pause rows at step boundaries and resume
the kept ones, so this is a hand-written batched decoding loop. The prompt is run through the policy (and a
separate critic) once; the caches are expanded (`batch_repeat_interleave`) to the N or K candidates of each
prompt. Every sampled token costs one forward of each model (one row per candidate; one forward in all when
the critic reads the policy's own hidden states), which yields the next token's logits and the critic's
features of the state after it. A row that reaches a step boundary keeps those as
"pending" and idles (fed padding with attention mask 0) until its whole batch reaches a boundary; then
each prompt keeps its best rows by value score, the cache rows are selected and expanded again.

Positions are passed explicitly (`position_ids` = count of real tokens so far), so the padding holes
idle rows leave in the cache change nothing for the real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from tokenq.guidance import Guide
from tokenq.steering import Steering, explicit_positions
from tokenq.tasks.protocol import check_values


@dataclass
class Rows:
    """Decoding state of R rows (candidates), grouped contiguously by prompt."""

    prompt_index: torch.Tensor  # (R,) which prompt each row belongs to
    mask: torch.Tensor  # (R, T) attention mask of everything fed so far: 1 = real token, 0 = padding or hole
    cache: DynamicCache
    critic_cache: DynamicCache | None  # the critic's own cache (None when it shares the policy's forward)
    logits: torch.Tensor  # (R, V) pending next-token logits
    h: torch.Tensor  # (R, H) features of each row's current state
    out: torch.Tensor  # (R, max_new) generated tokens, pad-filled
    n_gen: torch.Tensor  # (R,) generated tokens so far
    done: torch.Tensor  # (R,) bool: ended (EOS, stop string, budget)
    score: torch.Tensor  # (R,) value score: V(prompt) + summed advantages of the generated tokens
    kl: torch.Tensor  # (R,) summed KL(pi_guided || pi_beta) along the row

    def take(self, index: torch.Tensor) -> "Rows":
        """Rows at `index` (selection and expansion alike); the cache is re-indexed in place."""
        self.cache.batch_select_indices(index)
        if self.critic_cache is not None:
            self.critic_cache.batch_select_indices(index)
        fields = {k: getattr(self, k)[index] for k in ("prompt_index", "mask", "logits", "h", "out", "n_gen", "done", "score", "kl")}
        return Rows(cache=self.cache, critic_cache=self.critic_cache, **fields)


class CandidateSearch:
    """Shared machinery of the cache-sharing strategies; `spent_tokens` / `forward_rows` (the policy's) /
    `critic_forward_rows` (a separate critic's) count compute per prompt."""

    def __init__(self, steering: Steering, guide: Guide, *, max_new_tokens: int, eos_token_ids: list[int],
                 pad_token_id: int, stop_strings: list[str] | None = None, tokenizer=None) -> None:
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need `tokenizer=` to decode the generated text")
        self.steering, self.guide, self.max_new = steering, guide, max_new_tokens
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self.pad, self.stop_strings, self.tokenizer = pad_token_id, list(stop_strings or []), tokenizer
        self.spent_tokens: torch.Tensor | None = None
        self.forward_rows: torch.Tensor | None = None
        self.critic_forward_rows: torch.Tensor | None = None
        self.candidates: torch.Tensor | None = None  # (B, N, max_new), kept by candidates_then_pick
        self.candidate_scores: torch.Tensor | None = None

    def _forward(self, rows: Rows, new_tokens: torch.Tensor, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, h = self.steering.forward(rows.cache, rows.critic_cache, input_ids=new_tokens,
                                          attention_mask=torch.cat([rows.mask, new_mask], 1),
                                          position_ids=explicit_positions(rows.mask, new_mask))
        spent = torch.bincount(rows.prompt_index, minlength=len(self.forward_rows))
        self.forward_rows += spent
        if self.critic_forward_rows is not None:
            self.critic_forward_rows += spent
        return logits, h

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Rows:
        """Run the (left-padded) prompts once: one row per prompt."""
        batch = input_ids.shape[0]
        self.spent_tokens = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        self.forward_rows = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        self.critic_forward_rows = None if self.steering.shared else torch.zeros_like(self.forward_rows)
        self.eos = self.eos.to(input_ids.device)
        rows = Rows(
            prompt_index=torch.arange(batch, device=input_ids.device), mask=attention_mask[:, :0], cache=DynamicCache(),
            critic_cache=None if self.steering.shared else DynamicCache(),
            logits=None, h=None, out=torch.full((batch, self.max_new), self.pad, dtype=torch.long, device=input_ids.device),
            n_gen=torch.zeros(batch, dtype=torch.long, device=input_ids.device),
            done=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
            score=torch.zeros(batch, device=input_ids.device), kl=torch.zeros(batch, device=input_ids.device),
        )
        rows.logits, rows.h = self._forward(rows, input_ids, attention_mask)
        rows.mask, rows.score = attention_mask, self.guide.v_fn(rows.h)
        return rows

    def expand(self, rows: Rows, n: int) -> Rows:
        return rows.take(torch.arange(len(rows.done), device=rows.done.device).repeat_interleave(n))

    def decode(self, rows: Rows, boundary: Callable[[Rows, torch.Tensor], torch.Tensor] | None = None) -> Rows:
        """Sample until every row is done or (with `boundary`) has reached a step boundary."""
        live = ~rows.done
        while live.any():
            step = self.guide.step(None, rows.logits, rows.h)  # pi_beta's warpers ignore input_ids
            tok = torch.multinomial(torch.softmax(step.scores, -1), 1).squeeze(1) if self.guide.mode == "sample" else step.scores.argmax(-1)
            tok = torch.where(live, tok, torch.full_like(tok, self.pad))
            rows.score = rows.score + live * step.chosen_advantage(self.guide, rows.h, tok)
            if step.kl is not None:
                rows.kl = rows.kl + step.kl * live
            rows.out[live, rows.n_gen[live]] = tok[live]
            rows.n_gen = rows.n_gen + live
            self.spent_tokens += torch.bincount(rows.prompt_index[live], minlength=len(self.spent_tokens))
            rows.done |= live & (torch.isin(tok, self.eos) | (rows.n_gen >= self.max_new) | self._stopped(rows, live))
            feed = live & ~rows.done  # rows whose new state must be computed
            still = feed & ~(boundary(rows, feed) if boundary is not None else torch.zeros_like(feed))
            if feed.all():
                rows.logits, rows.h = self._forward(rows, tok.unsqueeze(1), feed.long().unsqueeze(1))
            elif feed.any():
                logits, h = self._forward(rows, tok.unsqueeze(1), feed.long().unsqueeze(1))
                rows.logits = torch.where(feed.unsqueeze(1), logits, rows.logits)
                rows.h = torch.where(feed.unsqueeze(1), h, rows.h)
            rows.mask = torch.cat([rows.mask, feed.long().unsqueeze(1)], 1)
            live = still
        return rows

    def _stopped(self, rows: Rows, live: torch.Tensor) -> torch.Tensor:
        """Rows whose generated text now ends with one of the (episode-ending) stop strings."""
        if not self.stop_strings:
            return torch.zeros_like(live)
        return self.text_ends_with(rows, live, torch.zeros_like(rows.n_gen), self.stop_strings)

    def text_ends_with(self, rows: Rows, which: torch.Tensor, start: torch.Tensor, suffixes: list[str]) -> torch.Tensor:
        """For rows in `which`: does the text of `out[start:n_gen]` end with one of `suffixes`?"""
        hit = torch.zeros_like(which)
        for r in which.nonzero().flatten().tolist():
            text = self.tokenizer.decode(rows.out[r, start[r] : rows.n_gen[r]])
            hit[r] = any(text.endswith(s) for s in suffixes)
        return hit

    def keep_best(self, rows: Rows, per_prompt: int) -> Rows:
        """Keep the `per_prompt` best-scoring rows of every prompt (rows are grouped by prompt)."""
        n_prompts = len(self.spent_tokens)
        group = len(rows.done) // n_prompts
        k = min(per_prompt, group)
        best = rows.score.view(n_prompts, group).topk(k, dim=1).indices
        return rows.take((best + group * torch.arange(n_prompts, device=best.device).unsqueeze(1)).flatten())


def candidates_then_pick(search: CandidateSearch, input_ids, attention_mask, n: int, strategy: str, reward_fn=None,
                         tokenizer=None, temperature: float = 1.0) -> Rows:
    """best_of_n (argmax of the scores) or resample (draw ∝ exp(score / temperature)) over n candidates.

    KL estimate of the selection, added to the chosen candidate's token KL: best-of-n, log n - (n-1)/n
    (Beirami et al. 2024's bound); resampling, KL(w || uniform) = sum_i w_i log(n w_i) of its weights."""
    rows = search.decode(search.expand(search.prefill(input_ids, attention_mask), n))
    batch = input_ids.shape[0]
    if reward_fn is not None:
        if tokenizer is None:
            raise ValueError("reward_fn needs `tokenizer=` to decode prompts and completions")
        prompts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        completions = [tokenizer.decode(rows.out[r, : rows.n_gen[r]], skip_special_tokens=True) for r in range(len(rows.done))]
        rewards = reward_fn([prompts[i] for i in rows.prompt_index.tolist()], completions)
        rewards = rewards["reward"] if isinstance(rewards, dict) else rewards  # a task-protocol score
        rewards = check_values(rewards, len(completions), f"reward_fn {getattr(reward_fn, '__name__', reward_fn)!r}")
        rows.score = torch.as_tensor(rewards, dtype=torch.float32, device=rows.score.device)
    scores = rows.score.view(batch, n)
    search.candidates, search.candidate_scores = rows.out.view(batch, n, -1).clone(), scores.clone()
    pick, selection_kl = pick_candidates(scores, strategy, temperature)
    chosen = rows.take(pick + n * torch.arange(batch, device=pick.device))
    chosen.kl = chosen.kl + selection_kl
    return chosen


def pick_candidates(scores: torch.Tensor, strategy: str, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, n) -> (picked index (B,), selection KL estimate (B,)): `best_of_n` takes the argmax,
    `resample` draws from softmax(scores / temperature)."""
    n = scores.shape[1]
    if strategy == "best_of_n":
        return scores.argmax(1), torch.full(scores.shape[:1], math.log(n) - (n - 1) / n, device=scores.device)
    weights = torch.softmax(scores / temperature, dim=1)
    pick = torch.multinomial(weights, 1).squeeze(1)
    return pick, (weights * torch.log(n * weights)).nan_to_num(0.0, neginf=0.0).sum(1)


def step_search(search: CandidateSearch, input_ids, attention_mask, k: int, step_stop_strings=None,
                step_tokens: int | None = None, step_beam: int = 1) -> Rows:
    """Step-level value search: from each kept partial sequence sample k continuations up to the next step
    boundary (a stop string in `step_stop_strings`, or `step_tokens` tokens), keep the `step_beam` best of every
    prompt by value score, repeat until done; return the best. Selection KL: log k - (k-1)/k per step."""
    stops = [step_stop_strings] if isinstance(step_stop_strings, str) else list(step_stop_strings or [])
    if not stops and not step_tokens:
        raise ValueError("step_search needs step_stop_strings (e.g. [';', '\\n']) or step_tokens")
    if stops and search.tokenizer is None:
        raise ValueError("step_stop_strings need `tokenizer=` to decode the generated text")
    rows = search.prefill(input_ids, attention_mask)
    while not rows.done.all():
        rows = search.expand(rows, k)
        start, finished_before = rows.n_gen.clone(), rows.done.clone()

        def boundary(r: Rows, which: torch.Tensor) -> torch.Tensor:
            hit = (r.n_gen - start >= step_tokens) if step_tokens else torch.zeros_like(which)
            if stops:
                hit = hit | search.text_ends_with(r, which & ~hit, start, stops)
            return hit & which

        rows = search.decode(rows, boundary)
        copy = torch.arange(len(rows.done), device=start.device) % k
        rows.score = rows.score.masked_fill(finished_before & (copy > 0), float("-inf"))  # one copy per finished row
        rows.kl = rows.kl + (~finished_before) * (math.log(k) - (k - 1) / k)
        rows = search.keep_best(rows, step_beam)
    return search.keep_best(rows, 1)
