"""A critic steering another model: every strategy, beta = 0, mismatched vocabularies, 4-bit policies, and the
explicit features the heads read."""

import copy

import pytest
import torch
from transformers import LogitsProcessor, set_seed
from trl import ModelConfig

from tokenq.backbone import load_backbone
from tokenq.generation import generate
from tokenq.guidance import SEARCH_TOP_K
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.steering import check_same_vocabulary
from tests.conftest import fixed_advantage_model, tiny_gpt2
from tests.test_generation import GuidedBeamReference, KW, left_padded

PROMPTS = ["abc", "x", "hello wor"]
STRATEGIES = [
    dict(strategy="sample", top_k=8),
    dict(strategy="sample", top_p=0.9, temperature=0.8),
    dict(strategy="greedy"),
    dict(strategy="beam", num_beams=3),
    dict(strategy="best_of_n", num_candidates=3, top_k=8),
    dict(strategy="resample", num_candidates=3, top_k=8),
    dict(strategy="step_search", num_continuations=3, step_tokens=3, step_beam=2, top_k=8),
]


def split_critic(model: TokenQModel) -> TokenQModel:
    """The same heads on a copy of the backbone: a critic that is a separate model with its own forward."""
    return TokenQModel(copy.deepcopy(model.backbone), model.tokenq_config, heads=copy.deepcopy(model.heads)).eval()


def random_critic_model(tokenizer, seed=3) -> TokenQModel:
    """A TokenQModel whose heads depend on the state (random, not tiny, weights)."""
    torch.manual_seed(seed)
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=seed), TokenQConfig())
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.3)
        model.heads.target_q.load_state_dict(model.heads.q.state_dict())
    return model.eval()


@pytest.mark.parametrize("kw, beam_path", [(kw, "default") for kw in STRATEGIES] + [(STRATEGIES[3], "public")],
                         ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else x)
def test_a_separate_critic_steers_exactly_as_the_shared_model(tokenizer, kw, beam_path, monkeypatch):
    """The critic's own forward (own KV cache, explicit positions, rows followed through beam reorders and candidate
    selection) gives the features the shared forward gives: the same tokens, scores and KL, token for token."""
    if beam_path == "public":  # "default": the path this transformers version takes
        monkeypatch.setattr("tokenq.generation.private_beam_loop_tested", lambda: False)
    model = random_critic_model(tokenizer)
    enc = left_padded(tokenizer, PROMPTS)
    set_seed(11)
    shared = generate(model, **enc, beta=2.0, **kw, **KW(tokenizer), tokenizer=tokenizer)
    set_seed(11)
    split = generate(model.backbone, **enc, critic=split_critic(model), beta=2.0, **kw, **KW(tokenizer), tokenizer=tokenizer)
    assert torch.equal(shared.sequences, split.sequences)
    assert torch.allclose(shared.scores, split.scores, atol=1e-4)
    if shared.kl is not None:
        assert torch.allclose(shared.kl, split.kl, atol=1e-4)
    assert shared.critic_forward_passes is None
    assert torch.equal(split.critic_forward_passes, split.forward_passes) and torch.equal(split.forward_passes, shared.forward_passes)


class FixedGuidance(LogitsProcessor):
    """HF-side reference of guided sampling / greedy with a state-independent advantage: pi_beta's top-k, + beta * A."""

    def __init__(self, advantage: torch.Tensor, beta: float, k: int) -> None:
        self.advantage, self.beta, self.k = advantage, beta, k

    def __call__(self, input_ids, scores):
        values, index = scores.topk(self.k, dim=-1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, index, values + self.beta * self.advantage[index])


def test_a_fixed_advantage_critic_steers_another_policy_as_known(tokenizer):
    """Policy: a plain HF LM; critic: another backbone whose A(s, a) = advantage[a] everywhere. Guided sampling and
    greedy are HF's on log pi + beta * A within pi_beta's filter; beam search is HF's beam search on those scores; the
    candidate strategies score a candidate V(s_0) + sum of the advantages of its tokens, and best-of-N keeps the best."""
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5)) * 3
    critic, policy = fixed_advantage_model(tokenizer, advantage), tiny_gpt2(len(tokenizer), seed=4).eval()
    enc = left_padded(tokenizer, PROMPTS)
    set_seed(5)
    reference = policy.generate(**enc, do_sample=True, top_k=0, logits_processor=[FixedGuidance(advantage, 2.0, 8)], **KW(tokenizer))
    set_seed(5)
    assert torch.equal(generate(policy, **enc, critic=critic, beta=2.0, top_k=8, **KW(tokenizer)).sequences, reference)
    reference = policy.generate(**enc, do_sample=False, logits_processor=[FixedGuidance(advantage, 2.0, SEARCH_TOP_K)], **KW(tokenizer))
    assert torch.equal(generate(policy, **enc, critic=critic, strategy="greedy", beta=2.0, **KW(tokenizer)).sequences, reference)
    reference = policy.generate(**enc, do_sample=False, num_beams=3, logits_processor=[GuidedBeamReference(advantage, 2.0, 6)], **KW(tokenizer))
    assert torch.equal(generate(policy, **enc, critic=critic, num_beams=3, beta=2.0, top_k=6, **KW(tokenizer)).sequences, reference)
    out = generate(policy, **enc, critic=critic, strategy="best_of_n", num_candidates=4, beta=1.0, top_k=8, **KW(tokenizer))
    candidates, eos = out.candidates, tokenizer.eos_token_id
    length = lambda c: int((c == eos).nonzero()[0]) + 1 if (c == eos).any() else len(c)  # noqa: E731
    expected = 0.5 + torch.stack([torch.stack([advantage[c[: length(c)]].sum() for c in row]) for row in candidates])
    assert torch.allclose(out.candidate_scores, expected, atol=1e-5)
    assert torch.allclose(out.scores, expected.max(1).values, atol=1e-5)


@pytest.mark.parametrize("kw", STRATEGIES[:4], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_beta_zero_with_a_critic_is_the_policys_own_hf_decoding(tokenizer, kw):
    policy, critic = tiny_gpt2(len(tokenizer), seed=4).eval(), random_critic_model(tokenizer)
    enc = left_padded(tokenizer, PROMPTS)
    hf_kw = {"sample": dict(do_sample=True, top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0), temperature=kw.get("temperature", 1.0)),
             "greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=3)}[kw["strategy"]]
    set_seed(9)
    reference = policy.generate(**enc, **hf_kw, **KW(tokenizer))
    set_seed(9)
    assert torch.equal(generate(policy, **enc, critic=critic, beta=0.0, **kw, **KW(tokenizer)).sequences, reference)


def test_a_critic_with_another_vocabulary_or_tokenizer_is_refused(tokenizer):
    policy, critic = tiny_gpt2(len(tokenizer)), TokenQModel(tiny_gpt2(len(tokenizer) + 3), TokenQConfig())
    enc = left_padded(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match=r"cannot steer the policy .*vocabularies of 50 and 53 tokens".replace("50", str(len(tokenizer)))
                       .replace("53", str(len(tokenizer) + 3))):
        generate(policy, **enc, critic=critic, **KW(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    same_size = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    with pytest.raises(ValueError, match="tokenizers that map"):
        check_same_vocabulary(policy, same_size, tokenizer, other)
    with pytest.raises(ValueError, match="has no value heads: pass critic="):
        generate(policy, **enc, **KW(tokenizer))


def test_a_4bit_policy_steered_by_an_fp32_critic(llama_dir, tokenizer):
    policy = load_backbone(ModelConfig(model_name_or_path=llama_dir, load_in_4bit=True)).eval()
    assert policy.is_loaded_in_4bit
    critic = random_critic_model(tokenizer)
    assert next(critic.parameters()).dtype == torch.float32
    enc = left_padded(tokenizer, PROMPTS)
    for kw in (dict(strategy="sample", top_k=8), dict(strategy="best_of_n", num_candidates=2)):
        out = generate(policy, **enc, critic=critic, beta=1.0, **kw, **KW(tokenizer))
        assert out.sequences.shape[0] == len(PROMPTS) and torch.isfinite(out.scores).all()
        assert (out.critic_forward_passes > 0).all()


def test_features_are_handed_back_not_left_on_the_model(tokenizer):
    """Features exist only inside `reading_features()`: no hook is left behind, a deep copy carries none, and a
    second model's forward never lands in the first one's tap."""
    model, other = random_critic_model(tokenizer), random_critic_model(tokenizer, seed=4)
    ids = tokenizer(["abc"], return_tensors="pt").input_ids
    hooks = lambda m: sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())  # noqa: E731
    before = hooks(model)
    with model.reading_features() as tap, other.reading_features() as other_tap:
        model.backbone(ids)
        assert other_tap.rows == 0
        h = tap.pop()
        with pytest.raises(RuntimeError, match="no features"):
            tap.pop()
        other.backbone(ids)
    assert hooks(model) == before and tap.rows == 1 and other_tap.rows == 1
    assert not torch.equal(h, other_tap.pop())
    copied = copy.deepcopy(model)
    assert not [k for m in copied.modules() for k, v in vars(m).items() if torch.is_tensor(v) or k.startswith("_tokenq")]
    with torch.no_grad():
        assert torch.equal(copied.features(ids, torch.ones_like(ids)), model.features(ids, torch.ones_like(ids)))


def test_search_strategies_with_a_critic_on_a_fixed_logit_policy(tokenizer):
    """pi: the same three tokens x, y, z in every state; the critic: A = +5 on x, 0 elsewhere, V = 0.5. Step search
    (a step = one token, 32 continuations each) writes x at every step (score 0.5 + 6 x 5); best-of-N and resampling
    at a tiny temperature return their best candidate, each candidate scored 0.5 + 5 x (its x's)."""
    from tests.test_distributional import fixed_logit_policy

    x, y, z = (tokenizer.convert_tokens_to_ids(c) for c in "xyz")
    policy = fixed_logit_policy(len(tokenizer), [x, y, z])
    advantage = torch.zeros(len(tokenizer))
    advantage[x] = 5.0
    critic = fixed_advantage_model(tokenizer, advantage)
    ids = tokenizer(["q", "q", "q"], return_tensors="pt").input_ids
    kw = dict(critic=critic, beta=0.0, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    set_seed(0)
    out = generate(policy, ids, strategy="step_search", num_continuations=32, step_tokens=1, **kw)
    assert (out.sequences[:, 1:] == x).all() and torch.allclose(out.scores, torch.full((3,), 30.5))
    assert torch.equal(out.critic_forward_passes, out.forward_passes)
    for strategy, extra in (("best_of_n", {}), ("resample", {"resample_temperature": 1e-3})):
        out = generate(policy, ids, strategy=strategy, num_candidates=8, **extra, **kw)
        assert torch.allclose(out.candidate_scores, 0.5 + 5.0 * (out.candidates == x).sum(-1).float())
        assert torch.allclose(out.scores, out.candidate_scores.max(1).values)
        assert torch.equal((out.sequences[:, 1:] == x).sum(1), (out.candidates == x).sum(-1).max(1).values)


def test_a_bf16_critic_backbone_steers_an_fp32_policy_and_bf16_heads_are_refused(tokenizer):
    policy = tiny_gpt2(len(tokenizer), seed=1).eval()
    critic = random_critic_model(tokenizer)
    enc = left_padded(tokenizer, PROMPTS)
    reference = generate(policy, **enc, critic=critic, strategy="greedy", beta=1.0, **KW(tokenizer))
    critic.backbone.to(torch.bfloat16)  # the features come in bf16; the heads read them in float32
    out = generate(policy, **enc, critic=critic, strategy="greedy", beta=1.0, **KW(tokenizer))
    assert out.sequences.shape == reference.sequences.shape and torch.isfinite(out.scores).all()
    critic.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"has value heads in bfloat16: tokenq's heads compute in float32"):
        generate(policy, **enc, critic=critic, strategy="greedy", beta=1.0, **KW(tokenizer))
