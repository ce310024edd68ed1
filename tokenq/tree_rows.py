"""Tree search on real models: the nodes' decoding states, kept so that no prefix is ever run twice.

Every expansion decodes a batch of `Rows` (`tokenq.search`); the store keeps each batch whole, its KV caches
included, and a node is a (batch, row) handle. Expanding nodes gathers their rows — from batches of different
lengths — into one batch (`tokenq.cache_rows.concat_rows`: the caches' rows copied, padded at the end with holes),
then expanded to k continuations. The prompt and every common prefix run once: a search spends one forward row per
generated token, plus one per prompt prefill (rows that finish their step early leave the batch: `CandidateSearch.decode`). `recompute=True` instead re-runs each gathered node from its prompt, as a search
without a prefix cache does (search-and-learn on vLLM without prefix caching): the same sequences and scores
(tested), more forward rows.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tokenq.cache_rows import concat_rows
from tokenq.search import CandidateSearch, Rows, Steps, grow_step
from tokenq.tree import Node, astar, mcts


class RowStore:
    """The decoding states of a search's nodes: each decoded batch of `Rows` kept whole; a node's handle is
    (batch, row)."""

    def __init__(self, search: CandidateSearch, prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.search, self.prompts, self.batches = search, prompts, []  # prompts given: recompute instead of caching

    def add(self, rows: Rows) -> list[tuple[int, int]]:
        if self.prompts is not None:
            rows.cache = rows.critic_cache = None  # never read again: recomputed from the prompt
        self.batches.append(rows)
        return [(len(self.batches) - 1, r) for r in range(len(rows.done))]

    def gather(self, handles: list[tuple[int, int]]) -> Rows:
        """The rows of `handles`, in order, as one batch (a fresh cache)."""
        by_batch = defaultdict(list)
        for position, (b, r) in enumerate(handles):
            by_batch[b].append((position, r))
        device = self.batches[0].done.device
        gathered = concat_rows([(self.batches[b], torch.tensor([r for _, r in items], device=device))
                                for b, items in by_batch.items()])
        if self.prompts is not None:
            gathered = self._recomputed(gathered)
        order = torch.tensor([position for items in by_batch.values() for position, _ in items], device=device)
        return gathered.take(torch.argsort(order))

    def _recomputed(self, rows: Rows) -> Rows:
        """Fresh caches for `rows`: each prompt and the row's generated tokens run again (left-padded)."""
        prompt_ids, prompt_mask = self.prompts
        sequences = [torch.cat([prompt_ids[p][prompt_mask[p].bool()], rows.out[r, : rows.n_gen[r]]])
                     for r, p in enumerate(rows.prompt_index.tolist())]
        longest = max(len(s) for s in sequences)
        ids = torch.stack([F.pad(s, (longest - len(s), 0), value=self.search.pad) for s in sequences])
        mask = torch.stack([F.pad(torch.ones_like(s), (longest - len(s), 0)) for s in sequences])
        rows.cache, rows.critic_cache = DynamicCache(), None if self.search.steering.shared else DynamicCache()
        rows.mask = mask[:, :0]
        rows.logits, rows.h = self.search.forward(rows, ids, mask)
        rows.mask = mask
        return rows


class ModelExpander:
    """`tokenq.tree.Expander` on a policy and critic: k continuations of one step (`steps`) per expanded node, each
    scored by `aggregate` of its step scores; identical siblings merged (they cost their tokens all the same)."""

    def __init__(self, search: CandidateSearch, k: int, steps: Steps, aggregate: str, recompute: bool = False) -> None:
        self.search, self.k, self.steps, self.aggregate, self.recompute = search, k, steps, aggregate, recompute
        self.store: RowStore | None = None

    def roots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Node]:
        rows = self.search.prefill(input_ids, attention_mask)
        self.store = RowStore(self.search, (input_ids, attention_mask) if self.recompute else None)
        return self._nodes(rows, range(len(rows.done)), [None] * len(rows.done))

    def spent(self, prompt: int) -> int:
        return int(self.search.spent_tokens[prompt])

    def expand(self, nodes: list[Node]) -> list[list[Node]]:
        rows, _, _ = grow_step(self.search, self.store.gather([n.handle for n in nodes]), self.k, self.steps)
        children = []
        for i, parent in enumerate(nodes):
            seen, distinct = set(), []
            for r in range(i * self.k, (i + 1) * self.k):
                tokens = tuple(rows.out[r, : rows.n_gen[r]].tolist())
                if tokens not in seen:
                    seen.add(tokens)
                    distinct.append(r)
            children.append(distinct)
        made = self._nodes(rows, [r for rs in children for r in rs], [p for p, rs in zip(nodes, children) for _ in rs])
        it = iter(made)
        return [[next(it) for _ in rs] for rs in children]

    def _nodes(self, rows: Rows, which, parents: list[Node | None]) -> list[Node]:
        handles, value = self.store.add(rows), rows.ranking(self.aggregate).tolist()
        return [Node(prompt=int(rows.prompt_index[r]), value=value[r], logp=float(rows.logp[r]), done=bool(rows.done[r]),
                     handle=handles[r], parent=parent) for r, parent in zip(which, parents)]

    def finish(self, nodes: list[Node]) -> Rows:
        """The nodes' rows, each decoded to its end (a partial answer continues with the policy, tokens counted)."""
        rows = self.search.decode(self.store.gather([n.handle for n in nodes]))
        rows.score = rows.ranking(self.aggregate)
        return rows


def tree_search(search: CandidateSearch, strategy: str, input_ids, attention_mask, n: int, k: int, step_stop_strings=None,
                step_tokens: int | None = None, aggregate: str = "advantage", c_puct: float = 1.0,
                recompute: bool = False) -> Rows:
    """`astar` or `mcts` over steps with a budget of n completions' tokens (n * max_new_tokens per prompt), k
    continuations per expansion; returns the answer rows (one per prompt)."""
    expander = ModelExpander(search, k, Steps.of(search, step_stop_strings, step_tokens, strategy), aggregate, recompute)
    roots = expander.roots(input_ids, attention_mask)
    budget = n * search.max_new
    answers = astar(expander, roots, budget) if strategy == "astar" else mcts(expander, roots, budget, c_puct)
    return expander.finish(answers)
