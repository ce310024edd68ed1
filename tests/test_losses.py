"""Each loss against numbers derived by hand (derivations in the comments)."""

import math

import pytest
import torch

from tokenq.losses import (
    action_logprob, awac_loss, categorical_value_loss, awr_loss, best_of_n_loss, best_of_n_targets, cql_loss, dqo_policy_loss, expectile_loss, iql_loss, linear_logsumexp, masked_mean, mc_value_loss, td_loss,
)


def test_masked_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert masked_mean(x, torch.tensor([1, 1, 1, 0])).item() == pytest.approx(2.0)
    assert masked_mean(x).item() == pytest.approx(4.0)
    assert masked_mean(x, torch.zeros(4)).item() == 0.0


def test_expectile_loss():
    # u = q - v = [0.5, -0.5]; weights |0.8 - 1(u<0)| = [0.8, 0.2]; loss = mean(0.8*0.25, 0.2*0.25) = 0.125
    q, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5], requires_grad=True)
    loss = expectile_loss(q, v, tau=0.8)
    assert loss.item() == pytest.approx(0.125)
    # d/dv = mean(-2 w u) = [-2*0.8*0.5, -2*0.2*(-0.5)] / 2 = [-0.4, 0.1]
    loss.backward()
    assert v.grad.tolist() == pytest.approx([-0.4, 0.1])
    # masked: only the first entry counts -> 0.8 * 0.25 = 0.2
    assert expectile_loss(q, v, 0.8, torch.tensor([1, 0])).item() == pytest.approx(0.2)
    # tau = 0.5 is half the MSE: 0.5 * 0.25 = 0.125 per entry
    assert expectile_loss(q, v, 0.5).item() == pytest.approx(0.125)


def test_expectile_minimiser_is_the_expectile():
    # the 0.9-expectile of {0, 1} (equal weights) solves 0.9 (1 - v) = 0.1 v -> v = 0.9
    v = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    q = torch.tensor([0.0, 1.0])
    for _ in range(500):
        opt.zero_grad()
        expectile_loss(q, v.expand(2), 0.9).backward()
        opt.step()
    assert v.item() == pytest.approx(0.9, abs=1e-4)


def test_td_loss_sums_heads():
    # head 1: ((1-1)^2 + (2-1)^2)/2 = 0.5; head 2: ((0-1)^2 + (2-1)^2)/2 = 1.0; sum = 1.5
    q = torch.tensor([[1.0, 2.0], [0.0, 2.0]])
    assert td_loss(q, torch.tensor([1.0, 1.0])).item() == pytest.approx(1.5)
    # mask keeps the first entry: 0 + 1 = 1
    assert td_loss(q, torch.tensor([1.0, 1.0]), torch.tensor([1, 0])).item() == pytest.approx(1.0)


def _cql_inputs(q_all: torch.Tensor, a: torch.Tensor):
    return torch.logsumexp(q_all, -1), q_all.gather(-1, a.expand(q_all.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def test_cql_loss():
    # Q(s, .) = [0, ln 3], a = 0: logsumexp = ln(1 + 3) = ln 4; minus Q(a) = 0 -> ln 4
    q_all = torch.tensor([[[0.0, math.log(3.0)]]])
    assert cql_loss(*_cql_inputs(q_all, torch.tensor([0]))).item() == pytest.approx(math.log(4.0))
    # a = 1: ln 4 - ln 3; two identical heads sum
    assert cql_loss(*_cql_inputs(q_all.repeat(2, 1, 1), torch.tensor([1]))).item() == pytest.approx(2 * math.log(4 / 3))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_logsumexp_equals_the_direct_computation(chunk):
    """Chunked forward and hand-written backward vs torch.logsumexp on the full (N, V) logits."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True) for shape in ((5, 8), (50, 8), (50,)))
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    direct = torch.logsumexp(x @ w.T + b, dim=-1)
    grads_direct = torch.autograd.grad((direct * g).sum(), (x, w, b))
    chunked = linear_logsumexp(x, w, b, chunk_size=chunk)
    grads_chunked = torch.autograd.grad((chunked * g).sum(), (x, w, b))
    assert (chunked - direct).abs().max().item() <= 1e-6
    assert all((a - d).abs().max().item() <= 1e-6 for a, d in zip(grads_chunked, grads_direct))
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))  # float32, as the heads run
    assert (linear_logsumexp(xf, wf, bf, chunk) - direct).abs().max().item() <= 1e-5
    assert torch.autograd.gradcheck(lambda *t: linear_logsumexp(*t, chunk), (x, w, b))


@pytest.mark.parametrize("q_head", ["low_rank", "unembed", "mlp"])
def test_heads_logsumexp_equals_logsumexp_of_full_q(q_head):
    from tokenq.heads import IQLHeads

    torch.manual_seed(0)
    unembed = torch.randn(30, 16)
    heads = IQLHeads(16, 30, q_head, inner_size=8, rank=4, unembed=unembed)
    h = torch.randn(6, 16)
    lse = heads.online_q(h, unembed, torch.zeros(6, 1, dtype=torch.long))[1]
    assert torch.allclose(lse, torch.logsumexp(heads.q_values(h, unembed), -1), atol=1e-6)


def test_awr_loss_weights_by_advantage_over_temperature():
    logits, a = torch.zeros(2, 2), torch.tensor([0, 1])
    adv = torch.tensor([0.0, 0.5 * math.log(3.0)])
    # temperature 0.5: weights exp(0) = 1 and exp(ln 3) = 3; CE of uniform over 2 = ln 2 -> (1 + 3) / 2 * ln 2
    assert awr_loss(logits, a, adv, temperature=0.5, max_weight=20.0).item() == pytest.approx(2 * math.log(2))
    # clipped at 2: (1 + 2) / 2 * ln 2
    assert awr_loss(logits, a, adv, temperature=0.5, max_weight=2.0).item() == pytest.approx(1.5 * math.log(2))
    # a large temperature weighs every action alike: plain behaviour cloning
    assert awr_loss(logits, a, adv, temperature=1e9, max_weight=20.0).item() == pytest.approx(math.log(2))
    # the weight carries no gradient: d/dlogits = weight * (softmax - onehot) / N
    logits.requires_grad_(True)
    awr_loss(logits, a, adv, temperature=0.5, max_weight=20.0).backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-0.25, 0.25, 0.75, -0.75])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        awr_loss(logits, a, adv, temperature=0.0, max_weight=20.0)


def test_best_of_n_targets_take_the_critics_first_choice():
    candidates = torch.tensor([[3, 1, 2], [0, 0, 4]])
    q = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, -1.0]])
    assert best_of_n_targets(candidates, q).tolist() == [1, 0]  # the argmax; a tie goes to the first


def test_best_of_n_loss_is_cross_entropy_on_the_best_candidate():
    # row 0: probs (1/4, 2/4, 1/4), best candidate token 1 -> -ln(1/2); row 1: uniform over 3, best token 2 -> ln 3
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    candidates = torch.tensor([[0, 1], [2, 0]])
    q = torch.tensor([[-1.0, 3.0], [5.0, 4.0]], requires_grad=True)
    loss = best_of_n_loss(logits, candidates, q)
    assert loss.item() == pytest.approx((math.log(2) + math.log(3)) / 2)
    loss.backward()
    assert q.grad is None or q.grad.abs().sum() == 0  # the critic's ranking is not trained
    # masked: only row 1 counts
    assert best_of_n_loss(logits, candidates, q, mask=torch.tensor([0, 1])).item() == pytest.approx(math.log(3))


def test_awac_loss_weight_and_clip():
    logits, a = torch.zeros(1, 2), torch.tensor([1])
    adv = torch.tensor([math.log(2.0)])
    # weight exp(1 * ln 2) = 2, CE of uniform over 2 = ln 2 -> 2 ln 2
    assert awac_loss(logits, a, adv, beta=1.0, max_weight=20.0).item() == pytest.approx(2 * math.log(2))
    # clipped weight 1.5 -> 1.5 ln 2
    assert awac_loss(logits, a, adv, beta=1.0, max_weight=1.5).item() == pytest.approx(1.5 * math.log(2))
    # beta = 0 is plain behaviour cloning: ln 2
    assert awac_loss(logits, a, adv, beta=0.0, max_weight=20.0).item() == pytest.approx(math.log(2))


def test_iql_loss_total_and_terms():
    # one action, vocabulary 2, two Q heads; y = 1, v = 0.5, target Q = [1, 0.8] -> qbar = 0.8
    q_all = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]])
    target_q = torch.tensor([[1.0], [0.8]])
    v, y, logits, a = torch.tensor([0.5]), torch.tensor([1.0]), torch.zeros(1, 2), torch.tensor([0])
    q_lse, q_t = _cql_inputs(q_all, a)
    out = iql_loss(q_t, q_lse, target_q, v, y, logits, a, tau=0.7, cql_scale=0.1, awac_scale=2.0, awac_beta=0.0, awac_max_weight=20.0)
    # L_Q = (1-1)^2 + (0.5-1)^2 = 0.25
    assert out.q.item() == pytest.approx(0.25)
    # L_V: u = 0.8 - 0.5 = 0.3 > 0 -> 0.7 * 0.09 = 0.063
    assert out.v.item() == pytest.approx(0.063)
    # L_CQL = [ln(e^1 + 1) - 1] + [ln(e^0.5 + 1) - 0.5]
    cql = math.log(math.e + 1) - 1 + math.log(math.exp(0.5) + 1) - 0.5
    assert out.cql.item() == pytest.approx(cql, rel=1e-6)
    assert out.awac.item() == pytest.approx(math.log(2))
    assert out.total.item() == pytest.approx(0.25 + 0.063 + 0.1 * cql + 2.0 * math.log(2), rel=1e-6)


def test_mc_value_loss_mse_and_bce():
    # mse: ((0.5 - 1)^2 + 0) / 2 = 0.125
    assert mc_value_loss(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0.125)
    # bce on logits [0, ln 3] vs [1, 0]: -ln sigmoid(0) = ln 2; -ln(1 - 0.75) = ln 4; mean 1.5 ln 2
    v = torch.tensor([0.0, math.log(3.0)])
    assert mc_value_loss(v, torch.tensor([1.0, 0.0]), "bce").item() == pytest.approx(1.5 * math.log(2))
    # K = 2 stacked heads are summed: 2 x 0.125
    assert mc_value_loss(torch.tensor([[0.5, 1.0], [0.5, 1.0]]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0.25)


def test_two_hot_and_the_categorical_value_loss_by_hand():
    """Atoms (0, 0.5, 1): 0.3 -> (0.4, 0.6, 0); an atom keeps all the mass; outside the range clips; 0.75 halves.
    Logits (0, ln 2, 0): p = (1/4, 1/2, 1/4); CE of g = 0.3: -(0.4 ln 1/4 + 0.6 ln 1/2) = 0.970406; of g = 1: ln 4."""
    from tokenq.distributional import categorical_value, two_hot

    atoms = torch.tensor([0.0, 0.5, 1.0])
    got = two_hot(torch.tensor([0.3, 0.5, 1.7, -1.0, 0.75]), atoms)
    expected = torch.tensor([[0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert torch.allclose(got, expected, atol=1e-6)
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]] * 2)
    loss = categorical_value_loss(logits, torch.tensor([0.3, 1.0]), atoms)
    assert loss.item() == pytest.approx((0.970406 + math.log(4.0)) / 2, abs=1e-5)
    assert categorical_value(logits[0], atoms).item() == pytest.approx(0.5)
    # Q_eta, eta = 0.5: 0.5 log(1/4 + 1/2 e + 1/4 e^2)
    assert categorical_value(logits[0], atoms, 0.5).item() == pytest.approx(0.5 * math.log(0.25 + 0.5 * math.e + 0.25 * math.e**2), abs=1e-6)


def test_action_logprob_by_hand():
    """logits (0, ln 3): pi = (1/4, 3/4)."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    got = action_logprob(logits, torch.tensor([0, 1]))
    assert torch.allclose(got, torch.tensor([math.log(0.25), math.log(0.75)]), atol=1e-7)


def test_dqo_policy_loss():
    # Q = 0.5 ln 2 + V(s) = 0.5; target y = 1 -> residual 0.5 ln 2 - 0.5 = -0.15343; weight min(2, cap)
    args = (torch.tensor([math.log(2.0)]), torch.tensor([0.5]), torch.tensor([1.0]))
    residual2 = (0.5 * math.log(2) - 0.5) ** 2
    assert dqo_policy_loss(*args, beta=0.5, max_weight=10.0).item() == pytest.approx(2 * residual2)
    assert dqo_policy_loss(*args, beta=0.5, max_weight=1.5).item() == pytest.approx(1.5 * residual2)
    # the gradient reaches the log-ratio only: d/dlr = w * 2 * residual * beta
    lr = torch.tensor([math.log(2.0)], requires_grad=True)
    v = torch.tensor([0.5], requires_grad=True)
    dqo_policy_loss(lr, v, args[2], beta=0.5, max_weight=10.0).backward()
    assert v.grad is None or v.grad.abs().sum() == 0
    assert lr.grad.item() == pytest.approx(2 * 2 * (0.5 * math.log(2) - 0.5) * 0.5)
