"""Held-out value diagnostics: the statistics against hand-derived numbers, and the gathering of V, Q, TD targets
and returns from a batch whose values are fixed."""

import numpy as np
import pytest
import torch

from tokenq.diagnostics import batch_estimates, flat_diagnostics, pearson, ranks, roc_auc, spearman, summarize


def test_ranks_average_ties():
    assert ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_correlations_and_auc_by_hand():
    assert pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 7])) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert pearson(np.array([1.0, 2]), np.array([3.0, 3])) is None  # constant side: undefined
    # positives 0.9, 0.5 vs negatives 0.1, 0.5: three pairs won, one tied -> 3.5 / 4
    assert roc_auc(np.array([0.9, 0.1, 0.5, 0.5]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


class FixedValues:
    """A model whose V (B, T) and Q at the actions (N,) are given."""

    def __init__(self, values, q_t):
        self.values, self.q_t = values, q_t

    def value_estimates(self, input_ids, attention_mask, action_mask):
        return self.values, self.q_t


def test_gathered_estimates_and_diagnostics_by_hand():
    # row 0: actions at 1, 2, reward 1 after the second, terminated; row 1 (4 tokens): actions at 0, 2, reward 0.5
    # after the first, truncated (its last action bootstraps from V of its final state, position 3).
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
             "action_mask": torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 0, 0]]),
             "rewards": torch.tensor([[0, 0, 1.0, 0, 0], [0.5, 0, 0, 0, 0]]),
             "terminated": torch.tensor([True, False])}
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 9.0]])
    q_t = torch.tensor([0.15, 1.0, 2.0, 2.0])  # exactly the TD targets below
    part = batch_estimates(FixedValues(values, q_t), batch, gamma=0.5)
    assert part["y"].tolist() == pytest.approx([0.15, 1.0, 2.0, 2.0])  # r + 0.5 V(next); row 1's last from V[3] = 4
    assert part["g"].tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0])  # return-to-go, discounted per action
    assert part["v0"].tolist() == pytest.approx([0.2, 1.0]) and part["g0"].tolist() == [0.5, 0.5] and part["row"].tolist() == [0, 0, 1, 1]
    report = summarize([part], tau=0.7)
    assert report["td_mse"] == pytest.approx(0.0)
    # u = q - v = [-0.05, 0.7, 1, -1]; weights |0.7 - 1(u<0)| = [0.3, 0.7, 0.7, 0.3]
    assert report["expectile_residual"] == pytest.approx((0.3 * 0.0025 + 0.7 * 0.49 + 0.7 + 0.3) / 4)
    assert report["v0"] == {"mse": pytest.approx(0.17), "pearson": None, "spearman": None, "spearman_p": None,
                            "roc_auc": None, "roc_auc_p": None}
    assert report["q"]["mse"] == pytest.approx((0.1225 + 0 + 2.25 + 4) / 4)
    assert flat_diagnostics(report) == {"value/td_mse": report["td_mse"], "value/expectile_residual": report["expectile_residual"],
                                        "value/v0_mse": report["v0"]["mse"], "value/q_mse": report["q"]["mse"],
                                        "value/q_pearson": report["q"]["pearson"], "value/q_spearman": report["q"]["spearman"],
                                        "value/q_spearman_p": report["q"]["spearman_p"]}


def test_auc_on_binary_outcomes_across_batches():
    """Rows' 0/1 outcomes label the rows (V) and every action of a row (Q); batches are concatenated."""
    def part(v0, g0):
        n = len(v0)
        return {"q": torch.tensor(v0), "v": torch.zeros(n), "y": torch.zeros(n), "g": torch.tensor(g0),
                "row": torch.arange(n), "v0": torch.tensor(v0), "g0": torch.tensor(g0)}

    report = summarize([part([0.9, 0.1], [1.0, 0.0]), part([0.5, 0.5], [1.0, 0.0])], tau=0.5)
    assert report["v0"]["roc_auc"] == pytest.approx(0.875) and report["q"]["roc_auc"] == pytest.approx(0.875)
    assert "q" not in summarize([part([0.9], [1.0])], tau=0.5, with_q=False)
