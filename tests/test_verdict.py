"""The verdict: the permutation bound against hand-derived numbers, and the right verdict on heads that are exactly
right (fixed values), on heads that are random, and on a task where guidance cannot help (reward independent of
the completion)."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from tests.conftest import tiny_gpt2
from tokenq.diagnostics import (auc_of_ranks, dataset_diagnostics, permutation_p, ranks, roc_auc, shuffled_index, spearman,
                                spearman_of_ranks, summarize)
from tokenq.evaluation import beta_configs, sweep
from tokenq.mdp import TokenCollator, tokenize_dataset
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.tasks import DatasetTask
from tokenq.verdict import guidance_verdict, margin, verdict


def test_shuffled_index_moves_whole_rows_at_relative_positions():
    row = np.array([0, 0, 1, 2, 2, 2])  # rows of 2, 1 and 3 entries
    # row 0 reads row 2 (3 entries) at positions 0, 1 -> 0*3//2 = 0, 1*3//2 = 1; row 1 reads row 0's first;
    # row 2 reads row 1's only entry at every position
    assert shuffled_index(row, np.array([2, 0, 1])).tolist() == [3, 4, 0, 2, 2, 2]
    assert shuffled_index(row, np.array([0, 1, 2])).tolist() == list(range(6))


def test_permutation_p_by_hand():
    # 3 rows of one entry, perfectly ranked: only the identity (1 of 6 orders) does as well
    x = np.array([1.0, 2.0, 3.0])
    assert permutation_p(x, x, np.arange(3), "spearman") == pytest.approx((1 + 999 / 6) / 1000, abs=0.04)
    assert permutation_p(x, np.ones(3), np.arange(3), "spearman") is None  # constant returns: undefined
    # the rank statistics from counts equal the plain ones, ties included
    rng = np.random.default_rng(3)
    pred, target = rng.integers(0, 5, size=50).astype(float), rng.integers(0, 4, size=50).astype(float)
    ranked, codes = ranks(pred), np.unique(target, return_inverse=True)[1]
    assert spearman_of_ranks(ranked, codes[None])[0] == pytest.approx(spearman(pred, target))
    labels = (target > 1).astype(float)
    assert auc_of_ranks(ranked, labels.astype(int)[None])[0] == pytest.approx(roc_auc(pred, labels))
    assert shuffled_index(np.array([0, 0, 1]), np.array([[1, 0], [0, 1]])).tolist() == [[2, 2, 0], [0, 1, 2]]


def test_the_bound_shuffles_rows_not_tokens():
    """Estimates and returns that are independent per row but shared by a row's 100 tokens: shuffling tokens would
    call many of them significant; shuffling rows keeps the false alarms at the test's level."""
    rng = np.random.default_rng(0)
    row = np.repeat(np.arange(10), 100)
    by_row, by_token = [], []
    for _ in range(20):
        pred, target = rng.normal(size=10)[row] + 0.01 * rng.normal(size=1000), rng.normal(size=10)[row]
        by_row.append(permutation_p(pred, target, row, "spearman", n=199))
        by_token.append(permutation_p(pred, target, np.arange(1000), "spearman", n=199))
    assert sum(p < 0.05 for p in by_row) <= 3 and sum(p < 0.05 for p in by_token) >= 8


def test_margin_is_two_standard_errors_corrected_for_the_best_of_k():
    assert margin(1) == pytest.approx(2.0) and margin(3) == pytest.approx(2.4284, abs=1e-4)


def test_exactly_right_heads_learned():
    """A fixed point: Q at every action and V(s_0) equal the realised return of 60 rows (0/1 outcomes)."""
    rng = np.random.default_rng(1)
    lengths, outcome = rng.integers(2, 6, size=60), rng.integers(0, 2, size=60).astype(float)
    row = np.repeat(np.arange(60), lengths)
    g = torch.tensor(outcome[row])
    part = {"q": g, "v": g, "y": g, "g": g, "row": torch.tensor(row), "v0": torch.tensor(outcome), "g0": torch.tensor(outcome)}
    said = verdict(summarize([part], tau=0.5), None, None)
    assert said["value_learned"] is True and said["guidance_helps"] is None
    assert said["value"]["spearman"] == pytest.approx(1.0) and said["value"]["spearman_p"] == pytest.approx(0.001)
    assert said["value"]["roc_auc"] == pytest.approx(1.0) and said["message"].startswith("The value function learned")


def _rows(prompt_rewards: dict[float, list[float]]) -> list[dict]:
    return [{"strategy": "sample", "beta": b, "reward": float(np.mean(r)), "prompt_rewards": r} for b, r in prompt_rewards.items()]


def test_guidance_verdict_by_hand():
    plain, guided = [0.0, 0.5, 0.5, 0.0, 0.5, 0.0], [1.0, 1.0, 0.5, 1.0, 1.0, 0.5]
    found = guidance_verdict(_rows({0.0: plain, 4.0: guided}), behaviour=0.25)
    # gain over plain: mean of [1, .5, 0, 1, .5, .5] = 0.5833, sd 0.3764, se 0.1537 -> 3.8 SE > 2
    assert found["gain_over_plain"] == pytest.approx(3.5 / 6) and found["se_over_plain"] == pytest.approx(0.15366, abs=1e-4)
    assert found["gain_over_data"] == pytest.approx(5 / 6 - 0.25) and found["guidance_helps"] is True
    # a gain of 2.71 SE (differences [1, .5, 0, .5, .5, 0]) wins alone, not as the best of 30 (margin 3.17 SE)
    noisy = [1.0, 1.0, 0.5, 0.5, 1.0, 0.0]
    assert guidance_verdict(_rows({0.0: plain, 4.0: noisy}), behaviour=None)["guidance_helps"] is True
    found = guidance_verdict(_rows({0.0: plain, **{float(b): noisy for b in range(1, 31)}}), behaviour=None)
    assert found["margin_se"] == pytest.approx(3.17, abs=0.01) and found["guidance_helps"] is False
    # per-prompt data rewards: compared pair by pair
    found = guidance_verdict(_rows({0.0: plain, 4.0: guided}), behaviour=0.9, behaviour_per_prompt=[0.9] * 6)
    assert found["gain_over_data"] < 0 and found["guidance_helps"] is False


def test_random_heads_and_a_reward_independent_of_the_completion(tokenizer):
    """Heads never trained, on a task whose reward is a coin flip whatever the completion: the value did not
    learn, guidance does not help, and the message says the first thing first."""
    coin = np.random.default_rng(0)

    def reward(prompts, completions):
        return coin.integers(0, 2, size=len(completions)).astype(float).tolist()

    held = Dataset.from_list([{"prompt": f"q{p}", "completion": c, "reward": float(coin.integers(0, 2))}
                              for p in "abcdefghijklmnopqrstuvwxyz" for c in ("ok!", "no", "yes")])
    task = DatasetTask(held, tokenizer, reward, max_new_tokens=4)
    torch.manual_seed(0)
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()).eval()
    diagnostics = dataset_diagnostics(model, tokenize_dataset(held, tokenizer), TokenCollator(tokenizer.pad_token_id), 1.0)
    rows = sweep(model, tokenizer, task, beta_configs([0, 1, 4, 16]), samples_per_prompt=4)
    said = verdict(diagnostics, rows, task.behavior_reward(), task.behavior_rewards())
    assert said["value_learned"] is False and said["value"]["spearman_p"] > 0.01
    assert said["guidance_helps"] is False and said["guidance"]["configurations"] == 3
    assert said["message"].startswith("THE VALUE FUNCTION DID NOT LEARN") and "tokenq tune" in said["message"]
