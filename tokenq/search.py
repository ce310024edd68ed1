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

from tokenq.cache_rows import concat_rows
from tokenq.guidance import Guide
from tokenq.steering import Steering, explicit_positions
from tokenq.tasks.protocol import check_values
from tokenq.votes import aggregate_steps, vote


PARK_FRACTION = 0.25  # rows that stopped early leave the batch once they are this share of it


@dataclass
class Rows:
    """Decoding state of R rows (candidates), grouped contiguously by prompt."""

    prompt_index: torch.Tensor  # (R,) which prompt (or search group) each row belongs to
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
    last_q: torch.Tensor  # (R,) min target Q of the last generated token
    logp: torch.Tensor  # (R,) summed log-probability of the generated tokens under the distribution they were drawn from
    step_scores: torch.Tensor  # (R, max_new) each finished step's score (Q of its last token); n_steps of them
    n_steps: torch.Tensor  # (R,) steps finished (a step ends at a boundary or at the end of the sequence)
    step_start: torch.Tensor  # (R,) n_gen when the current step began

    TENSORS = ("prompt_index", "mask", "logits", "h", "out", "n_gen", "done", "score", "kl", "last_q", "logp",
               "step_scores", "n_steps", "step_start")

    def take(self, index: torch.Tensor) -> "Rows":
        """Rows at `index` (selection and expansion alike); the cache is re-indexed in place."""
        self.cache.batch_select_indices(index)
        if self.critic_cache is not None:
            self.critic_cache.batch_select_indices(index)
        return Rows(cache=self.cache, critic_cache=self.critic_cache, **{k: getattr(self, k)[index] for k in self.TENSORS})

    def ranking(self, aggregate: str) -> torch.Tensor:
        """(R,) each row's score under `aggregate` (`tokenq.votes.aggregate_steps`)."""
        return aggregate_steps(self.step_scores, self.n_steps, aggregate, self.score)


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

    def forward(self, rows: Rows, new_tokens: torch.Tensor, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        device = input_ids.device
        zeros = torch.zeros(batch, device=device)
        rows = Rows(
            prompt_index=torch.arange(batch, device=device), mask=attention_mask[:, :0], cache=DynamicCache(),
            critic_cache=None if self.steering.shared else DynamicCache(),
            logits=None, h=None, out=torch.full((batch, self.max_new), self.pad, dtype=torch.long, device=device),
            n_gen=torch.zeros(batch, dtype=torch.long, device=device), done=torch.zeros(batch, dtype=torch.bool, device=device),
            score=zeros, kl=zeros, last_q=zeros, logp=zeros, step_scores=torch.full((batch, self.max_new), float("nan"), device=device),
            n_steps=torch.zeros(batch, dtype=torch.long, device=device),
            step_start=torch.zeros(batch, dtype=torch.long, device=device),
        )
        rows.logits, rows.h = self.forward(rows, input_ids, attention_mask)
        rows.mask, rows.score = attention_mask, self.guide.v_fn(rows.h)
        return rows

    def expand(self, rows: Rows, n: int) -> Rows:
        return rows.take(torch.arange(len(rows.done), device=rows.done.device).repeat_interleave(n))

    def decode(self, rows: Rows, boundary: Callable[[Rows, torch.Tensor], torch.Tensor] | None = None) -> Rows:
        """Sample until every row is done or (with `boundary`) has reached a step boundary. Rows that stop before the
        others are set aside (their cache rows copied out, `tokenq.cache_rows`) once they are a quarter of the batch,
        so that the forwards run on the rows still decoding; they are put back in their places at the end."""
        order, parked = torch.arange(len(rows.done), device=rows.done.device), []
        live = ~rows.done
        while live.any():
            if (~live).sum() >= PARK_FRACTION * len(live):
                idle, keep = (~live).nonzero().flatten(), live.nonzero().flatten()
                parked.append((concat_rows([(rows, idle)]), order[idle]))
                rows, order, live = rows.take(keep), order[keep], live[keep]
            step = self.guide.step(None, rows.logits, rows.h)  # pi_beta's warpers ignore input_ids
            tok = torch.multinomial(torch.softmax(step.scores, -1), 1).squeeze(1) if self.guide.mode == "sample" else step.scores.argmax(-1)
            tok = torch.where(live, tok, torch.full_like(tok, self.pad))
            q = step.chosen_value(self.guide.q_fn, rows.h, tok)
            rows.score = rows.score + live * (q - (step.v if step.v is not None else self.guide.v_fn(rows.h)))
            rows.last_q = torch.where(live, q, rows.last_q)
            logp = torch.log_softmax(step.scores, -1).gather(1, tok.unsqueeze(1)).squeeze(1)
            rows.logp = torch.where(live, rows.logp + logp, rows.logp)
            if step.kl is not None:
                rows.kl = rows.kl + step.kl * live
            rows.out[live, rows.n_gen[live]] = tok[live]
            rows.n_gen = rows.n_gen + live
            self.spent_tokens += torch.bincount(rows.prompt_index[live], minlength=len(self.spent_tokens))
            rows.done |= live & (torch.isin(tok, self.eos) | (rows.n_gen >= self.max_new) | self._stopped(rows, live))
            feed = live & ~rows.done  # rows whose new state must be computed
            still = feed & ~(boundary(rows, feed) if boundary is not None else torch.zeros_like(feed))
            ended = (live & ~still).nonzero().flatten()  # a step ends here: at a boundary, or with the sequence
            rows.step_scores[ended, rows.n_steps[ended]] = rows.last_q[ended]
            rows.n_steps = rows.n_steps.index_add(0, ended, torch.ones_like(ended))
            if feed.all():
                rows.logits, rows.h = self.forward(rows, tok.unsqueeze(1), feed.long().unsqueeze(1))
            elif feed.any():
                logits, h = self.forward(rows, tok.unsqueeze(1), feed.long().unsqueeze(1))
                rows.logits = torch.where(feed.unsqueeze(1), logits, rows.logits)
                rows.h = torch.where(feed.unsqueeze(1), h, rows.h)
            rows.mask = torch.cat([rows.mask, feed.long().unsqueeze(1)], 1)
            live = still
        if parked:
            everything = [*parked, (rows, order)]
            rows = concat_rows([(part, torch.arange(len(positions), device=positions.device)) for part, positions in everything])
            rows = rows.take(torch.argsort(torch.cat([positions for _, positions in everything])))
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

    def keep_best(self, rows: Rows, per_prompt: int, rank: torch.Tensor | None = None) -> Rows:
        """Keep the `per_prompt` best rows of every prompt (rows are grouped by prompt) by `rank` (R,) (default: the
        value score)."""
        n_prompts = len(self.spent_tokens)
        group = len(rows.done) // n_prompts
        k = min(per_prompt, group)
        best = (rows.score if rank is None else rank).view(n_prompts, group).topk(k, dim=1).indices
        return rows.take((best + group * torch.arange(n_prompts, device=best.device).unsqueeze(1)).flatten())

    def split_groups(self, rows: Rows, s: int) -> Rows:
        """Make each of the `s` copies of every prompt (rows grouped by prompt, s each) a search group of its own:
        `keep_best` then keeps rows per copy. The compute spent so far stays with the first copy."""
        for name in ("spent_tokens", "forward_rows", "critic_forward_rows"):
            counter = getattr(self, name)
            if counter is not None:
                grouped = torch.zeros(len(counter) * s, dtype=counter.dtype, device=counter.device)
                grouped[::s] = counter
                setattr(self, name, grouped)
        rows.prompt_index = torch.arange(len(rows.done), device=rows.done.device)
        return rows

    def merge_groups(self, rows: Rows, s: int) -> Rows:
        """Undo `split_groups`: the copies' compute summed per prompt."""
        for name in ("spent_tokens", "forward_rows", "critic_forward_rows"):
            counter = getattr(self, name)
            if counter is not None:
                setattr(self, name, counter.view(-1, s).sum(1))
        rows.prompt_index = rows.prompt_index // s
        return rows

    def answers(self, rows: Rows, answer_fn) -> list[str]:
        """`answer_fn(completion)` of every row (its generated tokens decoded)."""
        if self.tokenizer is None or answer_fn is None:
            raise ValueError("vote= needs answer_fn= (a completion's final answer, e.g. a task's `answer`) and "
                             "tokenizer= to decode the completions")
        texts = [self.tokenizer.decode(rows.out[r, : rows.n_gen[r]], skip_special_tokens=True) for r in range(len(rows.done))]
        return [str(answer_fn(t)) for t in texts]


def candidates_then_pick(search: CandidateSearch, input_ids, attention_mask, n: int, strategy: str, reward_fn=None,
                         tokenizer=None, temperature: float = 1.0, vote_how: str | None = None, answer_fn=None) -> Rows:
    """best_of_n (argmax of the scores) or resample (draw ∝ exp(score / temperature)) over n candidates, or with
    `vote_how` a vote over their answers (`tokenq.votes.vote`).

    KL estimate of the selection, added to the chosen candidate's token KL: best-of-n, log n - (n-1)/n
    (Beirami et al. 2024's bound); resampling, KL(w || uniform) = sum_i w_i log(n w_i) of its weights; a vote,
    log n (the most any choice of one of n samples can move)."""
    rows = search.decode(search.expand(search.prefill(input_ids, attention_mask), n))
    if reward_fn is not None:
        if tokenizer is None:
            raise ValueError("reward_fn needs `tokenizer=` to decode prompts and completions")
        prompts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        completions = [tokenizer.decode(rows.out[r, : rows.n_gen[r]], skip_special_tokens=True) for r in range(len(rows.done))]
        rewards = reward_fn([prompts[i] for i in rows.prompt_index.tolist()], completions)
        rewards = rewards["reward"] if isinstance(rewards, dict) else rewards  # a task-protocol score
        rewards = check_values(rewards, len(completions), f"reward_fn {getattr(reward_fn, '__name__', reward_fn)!r}")
        rows.score = torch.as_tensor(rewards, dtype=torch.float32, device=rows.score.device)
    return pick(search, rows, n, strategy, rows.score, temperature, vote_how, answer_fn)


def pick(search: CandidateSearch, rows: Rows, n: int, strategy: str, rank: torch.Tensor, temperature: float = 1.0,
         vote_how: str | None = None, answer_fn=None) -> Rows:
    """One of the n candidates of every prompt (rows grouped by prompt) by `rank` (R,), which becomes its score;
    the candidates are kept on `search` (`GuidedOutput.candidates`)."""
    batch = len(rows.done) // n
    scores = rank.view(batch, n)
    search.candidates, search.candidate_scores = rows.out.view(batch, n, -1).clone(), scores.clone()
    if vote_how is None:
        chosen, selection_kl = pick_candidates(scores, strategy, temperature)
    else:
        answers = search.answers(rows, answer_fn)
        chosen = torch.tensor([vote(answers[b * n : (b + 1) * n], scores[b], vote_how) for b in range(batch)], device=rank.device)
        selection_kl = torch.full((batch,), math.log(n), device=rank.device)
    index = chosen + n * torch.arange(batch, device=chosen.device)
    picked = rows.take(index)
    picked.score, picked.kl = rank[index], picked.kl + selection_kl
    return picked


def pick_candidates(scores: torch.Tensor, strategy: str, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, n) -> (picked index (B,), selection KL estimate (B,)): `best_of_n` takes the argmax,
    `resample` draws from softmax(scores / temperature)."""
    n = scores.shape[1]
    if strategy == "best_of_n":
        return scores.argmax(1), torch.full(scores.shape[:1], math.log(n) - (n - 1) / n, device=scores.device)
    weights = torch.softmax(scores / temperature, dim=1)
    pick = torch.multinomial(weights, 1).squeeze(1)
    return pick, (weights * torch.log(n * weights)).nan_to_num(0.0, neginf=0.0).sum(1)


@dataclass
class Steps:
    """Where a step ends: at one of `stops` (text the step ends with) or after `tokens` tokens."""

    stops: list[str]
    tokens: int | None

    @classmethod
    def of(cls, search: CandidateSearch, step_stop_strings, step_tokens: int | None, strategy: str) -> "Steps":
        stops = [step_stop_strings] if isinstance(step_stop_strings, str) else list(step_stop_strings or [])
        if not stops and not step_tokens:
            raise ValueError(f"{strategy} needs step_stop_strings (e.g. [';', '\\n']) or step_tokens")
        if stops and search.tokenizer is None:
            raise ValueError("step_stop_strings need `tokenizer=` to decode the generated text")
        return cls(stops, step_tokens)


def grow_step(search: CandidateSearch, rows: Rows, k: int, steps: Steps) -> tuple[Rows, torch.Tensor, torch.Tensor]:
    """k continuations of every row, each decoded to its next step boundary, from the row's cache (expanded, not
    recomputed). Returns the rows (R * k, grouped by parent), `finished_before` (R * k,): the parent had ended (its
    k copies are the same finished row) and `repeat` (R * k,): all but the first copy of such a row."""
    rows = search.expand(rows, k)
    rows.step_start, finished_before = rows.n_gen.clone(), rows.done.clone()

    def boundary(r: Rows, which: torch.Tensor) -> torch.Tensor:
        hit = (r.n_gen - r.step_start >= steps.tokens) if steps.tokens else torch.zeros_like(which)
        if steps.stops:
            hit = hit | search.text_ends_with(r, which & ~hit, r.step_start, steps.stops)
        return hit & which

    rows = search.decode(rows, boundary)
    copy = torch.arange(len(rows.done), device=rows.done.device) % k
    return rows, finished_before, finished_before & (copy > 0)


def step_loop(search: CandidateSearch, rows: Rows, k: int, steps: Steps, beam: int, aggregate: str) -> Rows:
    """Step-level value search from `rows`: k continuations of every kept row to its next step boundary, the `beam`
    best of every group kept by `aggregate` of their step scores, until every kept row has ended. Selection KL:
    log k - (k-1)/k per step."""
    while not rows.done.all():
        rows, finished_before, repeat = grow_step(search, rows, k, steps)
        rows.kl = rows.kl + (~finished_before) * (math.log(k) - (k - 1) / k)
        rows = search.keep_best(rows, beam, rows.ranking(aggregate).masked_fill(repeat, float("-inf")))
    return rows


def step_search(search: CandidateSearch, input_ids, attention_mask, k: int, step_stop_strings=None,
                step_tokens: int | None = None, step_beam: int = 1, aggregate: str = "advantage") -> Rows:
    """Step-level value search: from each kept partial sequence sample k continuations up to the next step
    boundary (a stop string in `step_stop_strings`, or `step_tokens` tokens), keep the `step_beam` best of every
    prompt by `aggregate` of their step scores, repeat until done; return the best."""
    steps = Steps.of(search, step_stop_strings, step_tokens, "step_search")
    rows = step_loop(search, search.prefill(input_ids, attention_mask), k, steps, step_beam, aggregate)
    rows = search.keep_best(rows, 1, rows.ranking(aggregate))
    rows.score = rows.ranking(aggregate)  # what GuidedOutput reports: the score the search ranked by
    return rows


def dvts(search: CandidateSearch, input_ids, attention_mask, n: int, k: int, step_stop_strings=None,
         step_tokens: int | None = None, aggregate: str = "advantage", vote_how: str | None = None, answer_fn=None) -> Rows:
    """Diverse verifier tree search (Beeching et al. 2024): the budget of n candidates split into max(1, n // k)
    independent subtrees from the shared prompt cache, each a step search with min(k, n) continuations per step that
    keeps its best one; the subtrees' answers are then picked from by `aggregate` (best) or by `vote_how`. One
    subtree is exactly `step_search` with k continuations."""
    steps = Steps.of(search, step_stop_strings, step_tokens, "dvts")
    subtrees = max(1, n // k)
    rows = search.split_groups(search.expand(search.prefill(input_ids, attention_mask), subtrees), subtrees)
    rows = search.merge_groups(step_loop(search, rows, min(k, n), steps, 1, aggregate), subtrees)
    return pick(search, rows, subtrees, "best_of_n", rows.ranking(aggregate), vote_how=vote_how, answer_fn=answer_fn)
