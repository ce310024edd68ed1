"""TD targets for terminal, truncated and multi-turn rows; Monte-Carlo returns."""

import pytest
import torch

from tokenq.returns import discounted_returns, gather_next, lambda_returns, next_state, td_target


def _ns(action_mask, length, terminated):
    am = torch.tensor([action_mask])
    att = torch.tensor([[1] * length + [0] * (len(action_mask) - length)])
    return next_state(am, att, torch.tensor([terminated]))


def test_terminal_row_ends_without_bootstrap():
    # tokens [p, p, c, c, eos]: actions at t = 1, 2, 3 (x[2], x[3], x[4])
    ns = _ns([0, 1, 1, 1, 0], 5, True)
    assert ns.index.tolist() == [[0, 2, 3, 0, 0]]
    assert ns.bootstrap.tolist() == [[0, 1, 1, 0, 0]]


def test_truncated_row_bootstraps_from_final_state():
    ns = _ns([0, 1, 1, 1, 0], 5, False)
    assert ns.index.tolist() == [[0, 2, 3, 4, 0]]
    assert ns.bootstrap.tolist() == [[0, 1, 1, 1, 0]]


def test_truncated_row_with_padding_uses_last_real_position():
    ns = _ns([0, 1, 1, 0, 0, 0], 4, False)
    assert ns.index[0, 2].item() == 3 and ns.bootstrap[0, 2].item() == 1


def test_multi_turn_skips_environment_tokens():
    # x = [u, a, a, u, u, a, a, <pad>]: action_mask[t] = 1 iff x[t+1] is an assistant token
    ns = _ns([1, 1, 0, 0, 1, 1, 0, 0], 7, True)
    # t=1 (last token of turn 1) bootstraps from t=4, the next state where the agent acts
    assert ns.index.tolist() == [[1, 4, 0, 0, 5, 0, 0, 0]]
    assert ns.bootstrap.tolist() == [[1, 1, 0, 0, 1, 0, 0, 0]]


def test_td_target_values():
    # y = r + gamma * bootstrap * V(s'): 0.5 + 0.9 * 2 = 2.3 ; terminal: 0.5
    y = td_target(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]), 0.9)
    assert y.tolist() == pytest.approx([2.3, 0.5])


def test_td_target_with_monte_carlo_lower_bound():
    # y = 0 + 1 * V(s') = 0.2 ; data returns G = 1.0 and 0.1 -> max: 1.0 (the bound binds), 0.2 (it does not)
    y = td_target(torch.zeros(2), torch.tensor([0.2, 0.2]), torch.ones(2), 1.0, lower_bound_t=torch.tensor([1.0, 0.1]))
    assert y.tolist() == pytest.approx([1.0, 0.2])


def test_td_targets_on_a_batch():
    # batch of a terminal and a truncated row, V(s_t) = t + 1
    am = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]])
    att = torch.ones(2, 4, dtype=torch.long)
    ns = next_state(am, att, torch.tensor([True, False]))
    values = torch.arange(1.0, 5.0).expand(2, 4)
    rewards = torch.tensor([[0, 0, 1.0, 0], [0, 0, 1.0, 0]])
    y = td_target(rewards, gather_next(values, ns), ns.bootstrap, 0.5)
    # t=1: 0 + 0.5 * V(s_2)=3 -> 1.5 in both; t=2: terminal 1.0, truncated 1 + 0.5 * V(s_3)=4 -> 3.0
    assert y[:, 1].tolist() == pytest.approx([1.5, 1.5])
    assert y[:, 2].tolist() == pytest.approx([1.0, 3.0])


def test_discounted_returns_per_action():
    # multi-turn row as above with rewards 1 at t=1 and 2 at t=5, gamma 0.5:
    # G5 = 2, G4 = 0.5*2 = 1, G1 = 1 + 0.5*1 = 1.5 (env tokens t=2,3 do not discount), G0 = 0.75
    am = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]])
    r = torch.tensor([[0, 1.0, 0, 0, 0, 2.0, 0, 0]])
    assert discounted_returns(r, am, 0.5).tolist() == [[0.75, 1.5, 0, 0, 1.0, 2.0, 0, 0]]


@pytest.mark.parametrize("terminated, lam, expected", [
    # terminal: G2 = 1; G1 = 0.5 [(1 - lam) V(s2) + lam G2]; G0 = 0.5 [(1 - lam) V(s1) + lam G1]
    (True, 0.5, [0.2, 0.4, 1.0]),
    (True, 1.0, [0.25, 0.5, 1.0]),  # Monte-Carlo
    (True, 0.0, [0.2, 0.3, 1.0]),  # one-step TD targets
    # truncated: the last action bootstraps from V(s3) = 0.8: G2 = 1 + 0.5 (0.5 * 0.8 + 0.5 * 0.8) = 1.4
    (False, 0.5, [0.225, 0.5, 1.4]),
])
def test_lambda_returns(terminated, lam, expected):
    am = torch.tensor([[1, 1, 1, 0]])
    ns = next_state(am, torch.ones_like(am), torch.tensor([terminated]))
    values = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    g = lambda_returns(torch.tensor([[0, 0, 1.0, 0]]), values, ns, am, gamma=0.5, lam=lam)
    assert g[0, :3].tolist() == pytest.approx(expected) and g[0, 3] == 0


def test_lambda_one_equals_discounted_returns_on_multi_turn_rows():
    am = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]])
    r = torch.tensor([[0, 1.0, 0, 0, 0, 2.0, 0, 0]])
    ns = next_state(am, torch.tensor([[1] * 7 + [0]]), torch.tensor([True]))
    g = lambda_returns(r, torch.randn(1, 8), ns, am, gamma=0.5, lam=1.0)
    assert torch.allclose(g, discounted_returns(r, am, 0.5))

