"""Guided sampling: beta = 0 is HF sampling token for token; a fixed advantage gives the known policy."""

import pytest
import torch
from transformers import set_seed

from tokenq.generation import AdvantageGuidance, behaviour_filter, guided_sample
from tokenq.modeling import TokenQConfig, TokenQModel
from tests.conftest import tiny_gpt2


def _left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=7, top_p=0.9, temperature=1.3), dict()])
def test_beta_zero_is_hf_sampling_token_for_token(tokenizer, filters):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    enc = _left_padded(tokenizer, ["abc", "x", "hello wor"])
    kw = dict(max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    set_seed(123)
    hf = model.backbone.generate(**enc, do_sample=True, top_k=filters.get("top_k", 0),
                                 top_p=filters.get("top_p", 1.0), temperature=filters.get("temperature", 1.0), **kw)
    set_seed(123)
    ours = guided_sample(model, enc.input_ids, enc.attention_mask, beta=0.0, **filters, **kw)
    assert torch.equal(hf, ours)


def _fixed_advantage_model(tokenizer, advantage: torch.Tensor) -> TokenQModel:
    """Heads whose A(s, a) = advantage[a] in every state: g = 0, Q = bias, V = 0.5."""
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=7), TokenQConfig())
    with torch.no_grad():
        for head in [*model.heads.q, *model.heads.target_q]:
            head.g[2].weight.zero_()
            head.g[2].bias.zero_()
            head.bias.copy_(advantage + 0.5)
        model.heads.v.net[2].weight.zero_()
        model.heads.v.net[2].bias.fill_(0.5)
    return model


def test_guidance_adds_beta_advantage_on_the_filtered_support_only(tokenizer):
    vocab = len(tokenizer)
    advantage = torch.linspace(-1.0, 1.0, vocab)
    model = _fixed_advantage_model(tokenizer, advantage).eval()
    ids = tokenizer(["abc"], return_tensors="pt").input_ids
    logits = model.backbone(ids).logits[:, -1]
    filtered = behaviour_filter(temperature=0.8, top_k=6)(ids, logits.clone())
    guided = AdvantageGuidance(model, beta=3.0)(ids, filtered.clone())
    finite = torch.isfinite(filtered)
    assert finite.sum() == 6 and torch.equal(torch.isfinite(guided), finite)
    assert torch.allclose(guided[finite], filtered[finite] + 3.0 * advantage[finite[0]], atol=1e-5)


def test_guided_sampling_frequencies_match_the_known_policy(tokenizer):
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(0)
    advantage = torch.rand(vocab, generator=gen)
    model = _fixed_advantage_model(tokenizer, advantage).eval()
    ids = tokenizer(["ab"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.backbone(ids).logits[0, -1]
    top = logits.topk(5)
    expected = torch.zeros(vocab)
    expected[top.indices] = torch.softmax(top.values + 2.0 * advantage[top.indices], dim=0)
    n = 4000
    set_seed(0)
    out = guided_sample(model, ids.expand(n, -1), torch.ones(n, ids.shape[1], dtype=torch.long), beta=2.0, top_k=5,
                        max_new_tokens=1, pad_token_id=0)
    freq = torch.bincount(out[:, -1], minlength=vocab).float() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert (freq - expected).abs().max() <= (4 * sigma).max() + 1e-3
    assert freq[expected == 0].sum() == 0


def test_large_beta_is_argmax_advantage_within_pi_beta_support(tokenizer):
    vocab = len(tokenizer)
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=7), TokenQConfig())
    ids = tokenizer(["ab"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.backbone(ids).logits[0, -1]
    support = logits.topk(3).indices
    advantage = torch.zeros(vocab)
    advantage[logits.argmin()] = 5.0  # the best advantage lies outside pi_beta's top-3: never chosen
    advantage[support[2]] = 1.0  # the best inside the support
    model = _fixed_advantage_model(tokenizer, advantage)
    set_seed(0)
    out = guided_sample(model, ids.expand(64, -1), None, beta=1e4, top_k=3, max_new_tokens=1, pad_token_id=0)
    assert (out[:, -1] == support[2]).all()
