"""`randomwalks`: shortest paths on a random graph, the toy of Decision Transformer (Chen et al. 2021).

The data are generated exactly as trlx's ILQL example does (same RandomState call sequence), so that
numbers compare with that peer on identical walks. Nodes are the letters a..u; node 0 (`a`) is the goal.
A sample's prompt is its start node, its completion the rest of the walk, and its reward, at the end, is

    optimality = (max_length - L) / (max_length - L*)

with L the number of nodes up to and including the goal (max_length for an invalid edge or no arrival)
and L* the same for a shortest path. Start nodes that cannot reach the goal within max_length nodes get
reward 0 in the data and are left out of evaluation (trlx divides by zero there).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from transformers import GPT2Config, PreTrainedTokenizerFast

from tokenq.tasks.chartok import build_char_tokenizer

GOAL = 0


def _letter(node: int) -> str:
    return chr(ord("a") + node)


@dataclass
class RandomWalks:
    """The random-walks task. Defaults are trlx's; `graph_seed` is the seed of graph *and* walks."""

    n_nodes: int = 21
    p_edge: float = 0.1
    max_length: int = 10
    n_walks: int = 1000
    graph_seed: int = 1000
    SEED_FIELD = "graph_seed"  # the data seed `get_task(name, seed=...)` sets
    name: str = field(default="randomwalks", init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.n_nodes <= 26:
            raise ValueError("n_nodes must be in [2, 26] (nodes are the letters a..z)")
        rng = np.random.RandomState(self.graph_seed)
        while True:
            adj = rng.rand(self.n_nodes, self.n_nodes) > 1 - self.p_edge
            np.fill_diagonal(adj, 0)
            if np.all(adj.sum(1)):
                break
        adj[GOAL, :] = 0
        adj[GOAL, GOAL] = 1
        self.adjacency = adj
        self.walks = [self._walk(rng) for _ in range(self.n_walks)]
        self.shortest = self._shortest_lengths()
        if not self.eval_prompts():
            raise ValueError(f"randomwalks graph_seed {self.graph_seed}: no node reaches the goal within "
                             f"{self.max_length} nodes, so there is nothing to learn or evaluate; pick another graph_seed")

    def _walk(self, rng: np.random.RandomState) -> list[int]:
        node = rng.randint(self.n_nodes)
        while node == GOAL:
            node = rng.randint(self.n_nodes)
        walk = [node]
        for _ in range(self.max_length - 1):
            node = rng.choice(np.nonzero(self.adjacency[node])[0])
            walk.append(int(node))
            if node == GOAL:
                break
        return walk

    def _shortest_lengths(self) -> dict[int, int]:
        """L* per start node (nodes on a shortest path, goal included), by BFS from the goal."""
        dist = {GOAL: 1}
        queue = deque([GOAL])
        while queue:
            v = queue.popleft()
            for u in np.nonzero(self.adjacency[:, v])[0]:
                if int(u) not in dist:
                    dist[int(u)] = dist[v] + 1
                    queue.append(int(u))
        return {n: min(dist.get(n, self.max_length), self.max_length) for n in range(self.n_nodes)}

    # ---- data -------------------------------------------------------------------------------------
    def dataset(self) -> Dataset:
        """Rows `{prompt, completion, reward}` (format 1 of the data model)."""
        return self._rows(self.walks)

    def eval_dataset(self, n_walks: int = 200) -> Dataset:
        """Held-out behaviour rows: `n_walks` new random walks on the same graph (another random stream), for the
        value diagnostics."""
        rng = np.random.RandomState(self.graph_seed + 1)
        return self._rows([self._walk(rng) for _ in range(n_walks)])

    def _rows(self, walks: list[list[int]]) -> Dataset:
        walks = ["".join(_letter(n) for n in w) for w in walks]
        rewards = [float(r) for r in self.score([w[0] for w in walks], [w[1:] for w in walks])["reward"]]
        return Dataset.from_dict(
            {"prompt": [w[0] for w in walks], "completion": [w[1:] for w in walks], "reward": rewards}
        )

    def behavior_reward(self) -> float:
        """The mean optimality of the behaviour data's walks."""
        return float(np.mean(self.dataset()["reward"]))

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_char_tokenizer([_letter(n) for n in range(self.n_nodes)])

    def model_config(self, tokenizer, n_layer: int = 6, n_embd: int = 144, n_head: int = 4) -> GPT2Config:
        """A tiny GPT-2 for training from scratch (trlx's peer: 6 layers, 144 wide)."""
        return GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=2 * self.max_length,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            # GPT-2's own activation (gelu_new: the tanh approximation of GELU) as one fused op: gelu_new's
            # chain of element-wise ops (pow, mul, tanh and their backward) led the training step's profile.
            activation_function="gelu_pytorch_tanh",
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    @property
    def max_new_tokens(self) -> int:
        return self.max_length - 1

    # ---- evaluation -------------------------------------------------------------------------------
    def eval_prompts(self) -> list[str]:
        """Every start node from which the goal can be reached within max_length nodes."""
        return [_letter(n) for n in range(self.n_nodes) if n != GOAL and self.shortest[n] < self.max_length]

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        """Per-sample `reward` (= `optimality`, also reported under that name), `length` (L, bounded by
        max_length) and `reached` (0/1)."""
        out: dict[str, list[float]] = {"reward": [], "optimality": [], "length": [], "reached": []}
        for prompt, completion in zip(prompts, completions, strict=True):
            length, reached = self._walk_outcome(prompt + completion)
            best = self.shortest[ord(prompt[0]) - ord("a")]
            reward = 0.0 if best >= self.max_length else (self.max_length - length) / (self.max_length - best)
            out["reward"].append(reward)
            out["optimality"].append(reward)
            out["length"].append(float(length))
            out["reached"].append(float(reached))
        return out

    def _walk_outcome(self, walk: str) -> tuple[int, bool]:
        """(L, reached): L = nodes up to and including the goal, max_length if the walk is invalid or
        never arrives (generation is capped at max_length nodes, so L <= max_length)."""
        nodes = [ord(c) - ord("a") for c in walk]
        for i, node in enumerate(nodes):
            if not 0 <= node < self.n_nodes or (i > 0 and not self.adjacency[nodes[i - 1], node]):
                return self.max_length, False
            if node == GOAL:
                return min(i + 1, self.max_length), True
        return self.max_length, False
