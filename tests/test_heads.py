"""Head parameter budget and head arithmetic."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tokenq.heads import IQLHeads, UnembedQHead


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_default_heads_cost_under_10_percent_of_gpt2_small():
    with torch.device("meta"):
        backbone = GPT2LMHeadModel(GPT2Config())  # 124M parameters, vocabulary 50,257
        backbone.tie_weights()  # transformers 5.0 does not tie on the meta device by itself
        heads = IQLHeads(768, 50257)  # V + 2 Q + 2 target Q, low-rank default
        trlx_style = IQLHeads(768, 50257, q_head="mlp")
    ratio = _count(heads) / _count(backbone)
    print(f"tokenq heads: {_count(heads) / 1e6:.2f}M = {ratio:.1%} of GPT-2 small; "
          f"trlx-style MLP heads: {_count(trlx_style) / _count(backbone):.0%}")
    assert _count(backbone) == pytest.approx(124.4e6, rel=0.01)
    assert ratio <= 0.10
    assert _count(trlx_style) / _count(backbone) > 2.0  # what the default avoids


@pytest.mark.parametrize("q_head", ["low_rank", "unembed", "mlp"])
def test_q_on_candidates_equals_the_full_q_gathered(q_head):
    """Every head's Q on candidate tokens (a gather of token rows) equals its full (N, V) Q gathered."""
    torch.manual_seed(0)
    heads = IQLHeads(8, 11, q_head, inner_size=16, rank=4, unembed=torch.randn(11, 8))
    for q in heads.q:
        torch.nn.init.normal_(q.g[2].weight if q_head != "mlp" else q.net[2].weight)
    h, unembed = torch.randn(3, 8), torch.randn(11, 8)
    index = torch.tensor([[0, 5], [10, 1], [3, 3]])
    full = heads.q_values(h, unembed)
    assert torch.allclose(heads.q_values(h, unembed, index), full.gather(-1, index.expand(2, -1, -1)), atol=1e-6)


def test_unembed_q_uses_detached_unembedding():
    head = UnembedQHead(4, 8, 5)
    w_u = torch.randn(5, 4, requires_grad=True)
    head(torch.randn(2, 4), w_u).sum().backward()
    assert w_u.grad is None


def test_polyak_update():
    heads = IQLHeads(4, 6, inner_size=8)
    online = [p.detach().clone() for p in heads.q.parameters()]
    before = [p.detach().clone() for p in heads.target_q.parameters()]
    with torch.no_grad():
        for p in heads.q.parameters():
            p.add_(1.0)
    heads.update_targets(0.25)
    for p_bar, p0, t0 in zip(heads.target_q.parameters(), online, before):
        assert torch.allclose(p_bar, 0.25 * (p0 + 1.0) + 0.75 * t0)
    assert not any(p.requires_grad for p in heads.target_q.parameters())


def test_stacked_low_rank_snapshot_matches_the_heads():
    from tokenq.heads import StackedLowRankQ

    torch.manual_seed(0)
    heads = IQLHeads(16, 40, inner_size=24, rank=8, unembed=torch.randn(40, 16))
    for p in heads.target_q.parameters():
        p.data.normal_()
    h, index = torch.randn(5, 16), torch.randint(0, 40, (5, 7))
    fused = StackedLowRankQ(list(heads.target_q))
    per_head = heads.q_values(h, None, None, target=True).min(0).values
    assert torch.allclose(fused.min_q(h), per_head, atol=1e-5)
    assert torch.allclose(fused.min_q(h, index), per_head.gather(1, index), atol=1e-5)


@pytest.mark.parametrize("q_head", ["low_rank", "unembed", "mlp"])
def test_online_q_equals_q_values_and_their_logsumexp_with_gradients(q_head):
    """The training forward's one pass per head gives the same Q at the actions, logsumexp and gradients as the
    direct computation over the whole vocabulary."""
    torch.manual_seed(0)
    heads = IQLHeads(8, 11, q_head, inner_size=16, rank=4, unembed=torch.randn(11, 8))
    h, unembed, index = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5, 1))

    def grads(q, lse):
        heads.zero_grad()
        (q.pow(2).sum() + lse.sum()).backward()
        return [p.grad.clone() for p in heads.q.parameters()]

    q, lse = heads.online_q(h, unembed, index)
    q_ref, lse_ref = heads.q_values(h, unembed, index), torch.logsumexp(heads.q_values(h, unembed), -1)
    assert torch.allclose(q, q_ref, atol=1e-6) and torch.allclose(lse, lse_ref, atol=1e-6)
    for g, g_ref in zip(grads(q, lse), grads(q_ref, lse_ref)):
        assert torch.allclose(g, g_ref, atol=1e-6)
    assert heads.online_q(h, unembed, index, logsumexp=False)[1] is None
