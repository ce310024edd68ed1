"""A*, MCTS and DVTS: the search logic on fixed trees (hand-derived), and on real models with a shared-prefix KV
cache that gives what recomputing every prefix gives."""

import math

import pytest
import torch
from transformers import DynamicCache, set_seed

from tokenq.generation import generate
from tokenq.guidance import Guide
from tokenq.search import CandidateSearch
from tokenq.steering import Steering
from tokenq.tree import Node, astar, mcts
from tokenq.cache_rows import cache_tensors
from tokenq.tree_rows import tree_search
from tests.conftest import fixed_advantage_model, tiny_gpt2
from tests.test_distributional import exact_critic, fixed_logit_policy
from tests.test_generation import left_padded


class FixedTree:
    """An expander over a fixed tree: `tree[name] = [(child, value, probability, done), ...]`; every child costs
    `cost` tokens."""

    def __init__(self, tree: dict, cost: int = 1) -> None:
        self.tree, self.cost, self.tokens = tree, cost, 0
        self.expanded: list[str] = []

    def spent(self, prompt: int) -> int:
        return self.tokens

    def expand(self, nodes: list[Node]) -> list[list[Node]]:
        out = []
        for node in nodes:
            self.expanded.append(node.handle)
            kids = self.tree[node.handle]
            self.tokens += self.cost * len(kids)
            out.append([Node(0, value, node.logp + math.log(p), done, handle=name, parent=node) for name, value, p, done in kids])
        return out


TREE = {  # A*: the best first step ("a", 0.6) leads only to poor leaves; the best leaf "b1" needs backtracking to "b"
    "root": [("a", 0.6, 0.25, False), ("b", 0.4, 0.75, False), ("c", 0.1, 0.05, False)],
    "a": [("a1", 0.2, 0.5, True), ("a2", 0.3, 0.5, False)],
    "b": [("b1", 0.9, 0.5, True), ("b2", 0.1, 0.5, False)],
    "a2": [("a21", 0.25, 1.0, True)],
}


def test_astar_expands_in_f_order_and_returns_the_best_leaf():
    """root (0.5) -> a 0.6, b 0.4, c 0.1; a -> a1 0.2 (done), a2 0.3; the frontier is then b 0.4 > a2 0.3 > a1 0.2 >
    c 0.1: b is expanded (backtracking) -> b1 0.9 (done), b2 0.1; b1 is popped: a goal, the answer."""
    tree, trace = FixedTree(TREE), []
    [answer] = astar(tree, [Node(0, 0.5, 0.0, False, handle="root")], token_budget=100, trace=trace)
    assert [n.handle for n in trace] == ["root", "a", "b"]
    assert [n.value for n in trace] == [0.5, 0.6, 0.4]
    assert answer.handle == "b1" and answer.done and tree.tokens == 3 + 2 + 2


def test_astar_within_its_budget_returns_the_best_frontier_node():
    """5 tokens: root and a are expanded (3 + 2 tokens), then the budget is spent: the best frontier node, b (0.4,
    unfinished), is the answer (the caller finishes it)."""
    tree = FixedTree(TREE)
    [answer] = astar(tree, [Node(0, 0.5, 0.0, False, handle="root")], token_budget=5)
    assert tree.expanded == ["root", "a"] and answer.handle == "b" and not answer.done


MCTS_TREE = {
    "root": [("a", 0.6, 0.25, False), ("b", 0.4, 0.75, False)],
    "b": [("b1", 0.9, 0.5, True), ("b2", 0.2, 0.5, False)],
}


def test_mcts_visit_counts_and_backed_up_values_by_hand():
    """c_puct 1, a budget of 5 tokens (1 per child, so also at most 5 simulations). Root: N 1, W 0.5.
    1: expand root -> a (0.6, P 0.25), b (0.4, P 0.75), each backed up: root N 3, W 1.5.
    2: PUCT(a) = 0.6 + 0.25 sqrt(3) / 2 = 0.817, PUCT(b) = 0.4 + 0.75 sqrt(3) / 2 = 1.050: expand b -> b1 (0.9,
       done), b2 (0.2): b N 3, W 1.5; root N 5, W 2.6 (4 tokens spent).
    3: a 0.6 + 0.25 sqrt(5) / 2 = 0.880 < b 0.5 + 0.75 sqrt(5) / 4 = 0.919; in b: b1 0.9 + 0.5 sqrt(3) / 2 = 1.333 >
       b2 0.633: b1 is finished, its 0.9 backed up: b1 N 2 W 1.8, b N 4 W 2.4, root N 6 W 3.5.
    4: a 0.906 < b 0.6 + 0.75 sqrt(6) / 5 = 0.967; b1 0.9 + 0.5 * 2 / 3 = 1.233 > b2 0.2 + 0.5 * 2 / 2 = 0.7: b1 again.
    5: a 0.931 < b 0.66 + 0.75 sqrt(7) / 6 = 0.991; b1 1.180 > b2 0.759: b1 again; 5 simulations: the end.
    The answer descends the most visited: b (6), then b1 (4)."""
    tree = FixedTree(MCTS_TREE)
    root = Node(0, 0.5, 0.0, False, handle="root")
    [answer] = mcts(tree, [root], token_budget=5, c_puct=1.0)
    nodes = {"root": root, "a": root.children[0], "b": root.children[1]}
    nodes |= {"b1": nodes["b"].children[0], "b2": nodes["b"].children[1]}
    assert {k: n.visits for k, n in nodes.items()} == {"root": 8, "a": 1, "b": 6, "b1": 4, "b2": 1}
    assert {k: n.value_sum for k, n in nodes.items()} == pytest.approx({"root": 5.3, "a": 0.6, "b": 4.2, "b1": 3.6, "b2": 0.2})
    assert nodes["a"].prior == pytest.approx(0.25) and nodes["b"].prior == pytest.approx(0.75)
    assert tree.expanded == ["root", "b"] and answer.handle == "b1"


def _search(model, tokenizer, max_new_tokens=6, critic=None, top_k=5):
    steering = Steering.of(model, critic)
    guide = Guide(steering.critic, 0.0, "sample", 1.0, top_k, None)
    return CandidateSearch(steering, guide, max_new_tokens=max_new_tokens, eos_token_ids=[tokenizer.eos_token_id],
                           pad_token_id=0, tokenizer=tokenizer)


@pytest.mark.parametrize("strategy", ["astar", "mcts"])
@pytest.mark.parametrize("separate_critic", [False, True])
def test_the_shared_prefix_cache_gives_what_recomputing_gives(tokenizer, strategy, separate_critic):
    """The same seed, the same sequences and scores whether every gathered node continues from its cache rows or
    re-runs its prompt and tokens (a search without a prefix cache); the cache spends fewer forward rows."""
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(3))
    model = fixed_advantage_model(tokenizer, advantage)
    policy, critic = (tiny_gpt2(len(tokenizer), seed=11).eval(), model) if separate_critic else (model, None)
    enc = left_padded(tokenizer, ["abc", "x"])
    results = {}
    for recompute in (False, True):
        search = _search(policy, tokenizer, critic=critic)
        set_seed(0)
        with torch.no_grad():
            rows = tree_search(search, strategy, enc["input_ids"], enc["attention_mask"], n=6, k=3, step_tokens=2,
                               recompute=recompute)
        results[recompute] = (rows, search)
    (shared, s_search), (again, r_search) = results[False], results[True]
    assert torch.equal(shared.out, again.out) and torch.equal(shared.n_gen, again.n_gen)
    assert torch.allclose(shared.score, again.score, atol=1e-5)
    assert torch.equal(s_search.spent_tokens, r_search.spent_tokens)
    assert (s_search.forward_rows < r_search.forward_rows).all()
    assert (s_search.forward_rows <= s_search.spent_tokens + 1).all()  # one row per token, plus the prompt
    if separate_critic:
        assert torch.equal(s_search.critic_forward_rows, s_search.forward_rows)


def test_dvts_with_one_subtree_is_step_search(tokenizer):
    model = fixed_advantage_model(tokenizer, torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5)))
    enc = left_padded(tokenizer, ["abc", "x"])
    outs = []
    for strategy, knobs in (("step_search", {}), ("dvts", {"num_candidates": 4})):
        set_seed(2)
        outs.append(generate(model, **enc, strategy=strategy, num_continuations=4, step_tokens=2, beta=0.0, top_k=6,
                             max_new_tokens=6, pad_token_id=0, **knobs))
    step, dvts = outs
    for field in ("sequences", "generated_tokens", "forward_passes"):
        assert torch.equal(getattr(step, field), getattr(dvts, field)), field
    assert torch.allclose(step.scores, dvts.scores) and torch.allclose(step.kl, dvts.kl)


def test_dvts_splits_the_budget_into_subtrees_and_votes(tokenizer):
    """16 candidates, 4 continuations per step: 4 subtrees, each its own step search from the shared prompt cache;
    the answer is one of theirs (the best score, or the answer most of them give)."""
    model = fixed_advantage_model(tokenizer, torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5)))
    enc = left_padded(tokenizer, ["abc"])
    set_seed(0)
    out = generate(model, **enc, strategy="dvts", num_candidates=16, num_continuations=4, step_tokens=2, beta=0.0, top_k=6,
                   max_new_tokens=6, pad_token_id=0)
    assert out.candidates.shape[:2] == (1, 4)
    assert out.generated_tokens.item() == 4 * 4 * 6  # 4 subtrees x 4 continuations x 6 tokens (no EOS here)
    assert out.scores.item() == out.candidate_scores.max().item()
    set_seed(0)
    voted = generate(model, **enc, strategy="dvts", num_candidates=16, num_continuations=4, step_tokens=2, beta=0.0, top_k=6,
                     max_new_tokens=6, pad_token_id=0, vote="majority", answer_fn=lambda c: c[-1:], tokenizer=tokenizer)
    last = [tokenizer.decode(c[c != 0])[-1:] for c in voted.candidates[0]]
    chosen = tokenizer.decode(voted.sequences[0, 3:][voted.sequences[0, 3:] != 0])[-1:]
    assert last.count(chosen) == max(last.count(a) for a in last)


@pytest.mark.parametrize("strategy", ["astar", "mcts"])
def test_tree_search_finds_the_rewarded_leaf_of_a_two_step_mdp(tokenizer, strategy):
    """A policy with fixed logits over three actions, a critic exact on the 2-step MDP with a 0/1 terminal reward
    (tests/test_distributional.py): the answer is a rewarded leaf, within its budget, one forward row per token."""
    from tests.test_distributional import REWARD

    prompt = tokenizer("q").input_ids
    actions = [tokenizer.convert_tokens_to_ids(c) for c in "xyz"]
    critic = exact_critic(tiny_gpt2(len(tokenizer), seed=5), prompt, actions)
    policy = fixed_logit_policy(len(tokenizer), actions)
    set_seed(0)
    out = generate(policy, torch.tensor([prompt]), critic=critic, strategy=strategy, num_candidates=4, num_continuations=8,
                   step_tokens=1, beta=0.0, max_new_tokens=2, pad_token_id=0, eos_token_id=[])
    a1, a2 = (actions.index(t) for t in out.sequences[0, len(prompt):].tolist())
    assert REWARD[a1, a2] == 1 and out.scores.item() == pytest.approx(1.0, abs=1e-3)
    assert out.generated_tokens.item() <= 4 * 2 + 8 * 2  # the budget, plus at most one expansion past it
    assert out.forward_passes.item() <= out.generated_tokens.item() + 1
    assert out.kl is None


def test_cache_tensors_reads_every_layer():
    """The one private read of a DynamicCache (transformers 5: layers[i].keys / .values): fails loudly if renamed."""
    keys = [torch.randn(2, 1, 3, 4) for _ in range(2)]
    cache = DynamicCache(ddp_cache_data=[(k, k + 1) for k in keys])
    tensors = cache_tensors(cache)
    assert len(tensors) == 2 and all(torch.equal(k, kk) and torch.equal(v, kk + 1) for (k, v), kk in zip(tensors, keys))


def test_new_knobs_are_checked(tokenizer):
    model = fixed_advantage_model(tokenizer, torch.zeros(len(tokenizer)))
    enc = left_padded(tokenizer, ["ab"])
    with pytest.raises(ValueError, match="aggregate must be one of"):
        generate(model, **enc, strategy="astar", aggregate="max", step_tokens=1)
    with pytest.raises(ValueError, match="aggregate='min' ranks step scores: it applies to strategies"):
        generate(model, **enc, strategy="best_of_n", aggregate="min")
    with pytest.raises(ValueError, match="vote='majority' picks among candidates"):
        generate(model, **enc, strategy="astar", vote="majority", step_tokens=1)
    with pytest.raises(ValueError, match="vote= needs answer_fn="):
        generate(model, **enc, strategy="best_of_n", vote="weighted")
    with pytest.raises(ValueError, match="c_puct must be a finite number >= 0"):
        generate(model, **enc, strategy="mcts", c_puct=-1.0, step_tokens=1)
    with pytest.raises(ValueError, match="mcts needs step_stop_strings"):
        generate(model, **enc, strategy="mcts", pad_token_id=0)
