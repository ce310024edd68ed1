"""Tree search over reasoning steps: A* (Q*, Wang et al. 2024) and Monte-Carlo tree search (PUCT: Silver et al. 2017;
Agent Q, Putta et al. 2024; rStar, Qi et al. 2024).

A node is a partial solution (the prompt and the steps written so far); expanding it samples `k` continuations of
one step each from the policy (`tokenq.tree_rows.ModelExpander`: from the node's own KV cache, siblings never
recomputed) and scores each child with the critic (its `value`: the path's score, `tokenq.votes.aggregate_steps`).
The search logic here only sees nodes and an expander, so it is tested on fixed trees.

A* keeps, per prompt, a priority queue of frontier nodes ordered by f = g + h: with the default aggregate
(`advantage`) the path's value score `V(s_0) + sum_t A(s_t, a_t)`, which telescopes to g, the rewards its tokens
earn, plus h, the value of what may follow; with a step-score aggregate (`last`, `min`, ...), that aggregate (Q*'s
"aggregated utility" of the path, which already reads the prefix's value). Each round it pops the best frontier
node: a finished one is the answer (A*'s goal test); else it is expanded and its children join the frontier —
backtracking to any earlier node when its children score worse. When the token budget is spent before a goal is
popped, the best frontier node is the answer (finished by the policy if it is partial).

MCTS runs simulations: from the root, descend to the child maximising the PUCT score
`Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c))` (Q = mean backed-up value, N = visits, P = the policy's
probability of the child's step, normalised over the distinct siblings) until a leaf; expand it; each new child is
evaluated by the critic (its value, no rollout) and that value is backed up along the path (one visit per child,
to the child and every ancestor). A finished leaf is not expanded: its value is backed up again. When the budget
is spent, the answer is found by descending the most-visited children (ties: higher mean value).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(eq=False)
class Node:
    """A partial (or finished) solution of prompt `prompt`."""

    prompt: int
    value: float  # the path's score (A*'s f, MCTS's leaf evaluation)
    logp: float  # log-probability of the path's tokens under the policy they were sampled from
    done: bool  # the sequence has ended
    handle: Any = None  # the expander's reference to the node's decoding state
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    prior: float = 1.0  # P(step | parent) among the distinct siblings (MCTS)
    visits: int = 0
    value_sum: float = 0.0

    @property
    def mean_value(self) -> float:
        return self.value_sum / self.visits if self.visits else self.value


class Expander(Protocol):
    def spent(self, prompt: int) -> int:
        """Tokens generated for `prompt` so far."""

    def expand(self, nodes: list[Node]) -> list[list[Node]]:
        """The distinct children of every (unfinished) node, one step each, with `parent` set."""


def astar(expander: Expander, roots: list[Node], token_budget: int, trace: list[Node] | None = None) -> list[Node]:
    """A* from every prompt's root (batched: each round expands one node per prompt) until a finished node is popped
    or `token_budget` tokens are spent; returns each prompt's answer node (possibly unfinished: then it is the best
    frontier node). `trace` collects the expanded nodes in order."""
    order = itertools.count()
    frontiers = [[(-root.value, next(order), root)] for root in roots]
    answers: list[Node | None] = [None] * len(roots)
    while True:
        todo = []
        for p, frontier in enumerate(frontiers):
            if answers[p] is not None or expander.spent(p) >= token_budget or not frontier:
                continue
            node = heapq.heappop(frontier)[2]
            if node.done:
                answers[p] = node
            else:
                todo.append(node)
        if not todo:
            break
        if trace is not None:
            trace.extend(todo)
        for children in expander.expand(todo):
            for child in children:
                heapq.heappush(frontiers[child.prompt], (-child.value, next(order), child))
    return [answer if answer is not None else frontier[0][2] for answer, frontier in zip(answers, frontiers)]


def puct(parent: Node, child: Node, c_puct: float) -> float:
    """`Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c))`."""
    return child.mean_value + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def select(root: Node, c_puct: float) -> Node:
    """Descend by the PUCT score (the first child on a tie) to a node without children."""
    node = root
    while node.children:
        parent = node
        node = max(parent.children, key=lambda child: puct(parent, child, c_puct))
    return node


def backup(node: Node | None, value: float) -> None:
    """One visit with `value` for `node` and every ancestor."""
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def attach(leaf: Node, children: list[Node]) -> None:
    """Make `children` the leaf's, their priors the policy's step probabilities normalised over them, each evaluated
    once (its value backed up from itself to the root)."""
    weights = [math.exp(child.logp - leaf.logp) for child in children]
    total = sum(weights)
    leaf.children = children
    for child, weight in zip(children, weights):
        child.prior = weight / total if total > 0 else 1.0 / len(children)
        backup(child, child.value)


def most_visited(root: Node) -> Node:
    """Descend the most-visited children (ties: higher mean value, then the first)."""
    node = root
    while node.children:
        node = max(node.children, key=lambda child: (child.visits, child.mean_value))
    return node


def mcts(expander: Expander, roots: list[Node], token_budget: int, c_puct: float = 1.0) -> list[Node]:
    """MCTS from every prompt's root (batched: one simulation per prompt per round) until `token_budget` tokens (or
    as many simulations) are spent; returns each prompt's answer node (`most_visited`, possibly unfinished)."""
    for root in roots:
        root.visits, root.value_sum = 1, root.value
    simulations = [0] * len(roots)
    while True:
        active = [p for p in range(len(roots)) if expander.spent(p) < token_budget and simulations[p] < token_budget]
        if not active:
            break
        leaves = []
        for p in active:
            simulations[p] += 1
            leaf = select(roots[p], c_puct)
            if leaf.done:
                backup(leaf, leaf.value)
            else:
                leaves.append(leaf)
        if leaves:
            for leaf, children in zip(leaves, expander.expand(leaves)):
                attach(leaf, children)
    return [most_visited(root) for root in roots]
