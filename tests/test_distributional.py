"""Q♯'s Q_eta from a distributional critic: against enumeration on a tiny token MDP, and guided sampling with it
against the closed-form KL-optimal policy."""

import itertools
import math

import pytest
import torch
from transformers import set_seed

from tokenq.distributional import bernoulli_q_eta
from tokenq.generation import generate
from tokenq.modeling import TokenQConfig, TokenQModel
from tests.conftest import fixed_advantage_model, tiny_gpt2

PI_LOGITS = torch.tensor([0.4, 0.0, -0.6])  # pi_ref over the three actions, in every state
REWARD = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]])  # terminal 0/1 reward of (a1, a2): two actions, then the end
GRADED = torch.tensor([[1.0, 0.0, 0.5], [0.5, 1.0, 0.0], [0.0, 0.5, 1.0]])  # a reward on the atoms (0, 0.5, 1)
KINDS = {"bernoulli": (REWARD, 0), "categorical": (GRADED, 3)}


def test_bernoulli_q_eta_by_hand():
    """p = 0.25, eta = 0.5: 0.5 log(0.75 + 0.25 e^2) = 0.47723; eta -> inf: E[Z] = p; eta -> 0: max Z = 1."""
    logit = torch.logit(torch.tensor(0.25))
    assert bernoulli_q_eta(logit, 0.5).item() == pytest.approx(0.5 * math.log(0.75 + 0.25 * math.e ** 2), abs=1e-6)
    assert bernoulli_q_eta(logit, 0.5).item() == pytest.approx(0.47723, abs=1e-5)
    assert bernoulli_q_eta(logit, 1e4).item() == pytest.approx(0.25, abs=1e-4)
    assert bernoulli_q_eta(logit, 1e-3).item() == pytest.approx(1.0, abs=2e-3)
    assert torch.isfinite(bernoulli_q_eta(torch.tensor([-80.0, 80.0]), 1e-4)).all()


def fixed_logit_policy(vocab: int, actions: list[int]) -> torch.nn.Module:
    """An HF LM whose next-token logits are the same in every state: PI_LOGITS on `actions`, -1e4 elsewhere
    (the final norm outputs e_0, and column 0 of the unembedding holds the logits)."""
    model = tiny_gpt2(vocab, seed=1)
    logits = torch.full((vocab,), -1e4)
    logits[actions] = PI_LOGITS
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = logits
    return model.eval()


def exact_critic(backbone, prompt: list[int], actions: list[int], reward: torch.Tensor = REWARD, bins: int = 0,
                 head_layer: int = -1) -> TokenQModel:
    """A distributional critic (linear heads) exact at the four states of the MDP, the prompt s0 and s0 + a1, for the
    terminal reward table `reward` (a1, a2): a Bernoulli (sigmoid link; the logit of P(Z = 1)) or, with `bins`, a
    categorical over `bins` atoms on [0, 1] (log-probabilities, -30 for none). Z(s0, a1) = r(a1, a2), a2 ~ pi_ref;
    Z(s0 + a1, a2) = r(a1, a2); V's distributions: Z(s0) over both actions, Z(s0 + a1) = Z(s0, a1). The heads are
    solved from the features of `backbone`."""
    config = TokenQConfig(q_head="mlp", head_inner_size=0, num_q_heads=1, value_link="sigmoid" if not bins else "identity",
                          head_layer=head_layer, return_bins=bins)
    critic, vocab = TokenQModel(backbone, config), backbone.config.vocab_size
    pi = torch.softmax(PI_LOGITS.double(), 0)
    atoms = torch.linspace(0, 1, bins, dtype=torch.float64) if bins else torch.tensor([0.0, 1.0], dtype=torch.float64)
    point = (reward.double().unsqueeze(-1) == atoms).double()  # (a1, a2, atoms): the return's atom
    after_a1 = (pi[None, :, None] * point).sum(1)  # (a1, atoms): Z(s0, a1)
    at_s0 = (pi[:, None] * after_a1).sum(0)  # Z(s0)

    def head_output(dist: torch.Tensor) -> torch.Tensor:  # (..., atoms) -> what the head outputs
        return dist.clamp(min=1e-13).log().clamp(min=-30.0) if bins else torch.logit(dist[..., 1].clamp(1e-13, 1 - 1e-13))

    states = [prompt] + [prompt + [a] for a in actions]
    channels = bins or 1
    q_targets = torch.zeros(channels, len(states), vocab, dtype=torch.float64)
    for i in range(len(actions)):
        q_targets[:, 0, actions[i]] = head_output(after_a1[i]).reshape(channels)
        q_targets[:, 1 + i, actions] = head_output(point[i]).reshape(-1, channels).T
    v_targets = head_output(torch.cat([at_s0.unsqueeze(0), after_a1])).reshape(len(states), channels)
    h = torch.stack([critic.features(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1] for s in states]).double()
    solve = torch.linalg.pinv(torch.cat([h, torch.ones(len(states), 1, dtype=torch.float64)], 1))
    with torch.no_grad():
        fits = [(critic.heads.q[k].net[0], q_targets[k]) for k in range(channels)] + [(critic.heads.v.net[0], v_targets)]
        for head_net, targets in fits:
            w = solve @ targets  # (H + 1, out)
            head_net.weight.copy_(w[:-1].T.float())
            head_net.bias.copy_(w[-1].float())
        critic.heads.target_q.load_state_dict(critic.heads.q.state_dict())
    return critic.eval()


@pytest.fixture(params=list(KINDS))
def mdp(tokenizer, request):
    """(prompt, actions, policy, exact critic, reward table, bins) for a Bernoulli and a categorical critic."""
    prompt = tokenizer("q").input_ids
    actions = [tokenizer.convert_tokens_to_ids(c) for c in "xyz"]
    vocab, (reward, bins) = len(tokenizer), KINDS[request.param]
    critic = exact_critic(tiny_gpt2(vocab, seed=5), prompt, actions, reward, bins)
    return prompt, actions, fixed_logit_policy(vocab, actions), critic, reward, bins


@pytest.mark.parametrize("eta", [0.1, 0.5, 1.0, 4.0])
def test_q_eta_of_an_exact_critic_equals_enumeration(mdp, eta):
    """Q_eta(s, a) = eta log E[exp(r / eta)] over pi_ref's continuations, at every state and action of the MDP; without
    eta, E[r]."""
    prompt, actions, _, critic, reward, _ = mdp
    pi = torch.softmax(PI_LOGITS.double(), 0)
    q_fn, v_fn = critic.decoding_q(eta), critic.decoding_v(eta)
    h = lambda s: critic.features(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[:, -1]  # noqa: E731
    index = torch.tensor([actions])
    expected_s0 = [eta * math.log(sum(pi[j] * math.exp(reward[i, j] / eta) for j in range(3))) for i in range(3)]
    assert torch.allclose(q_fn(h(prompt), index)[0].double(), torch.tensor(expected_s0, dtype=torch.float64), atol=1e-4)
    expected_v0 = eta * math.log(sum(pi[i] * pi[j] * math.exp(reward[i, j] / eta) for i, j in itertools.product(range(3), range(3))))
    assert v_fn(h(prompt)).item() == pytest.approx(expected_v0, abs=1e-4)  # V's distribution: over both actions
    for i, a in enumerate(actions):
        assert torch.allclose(q_fn(h(prompt + [a]), index)[0].double(), reward[i].double(), atol=1e-4)
    mean_s0 = (pi * reward.double()).sum(1)  # E[Z(s0, a1)]
    assert torch.allclose(critic.candidate_values(h(prompt), index)[0].double(), mean_s0, atol=1e-4)


@pytest.mark.parametrize("separate", [True, False], ids=["policy+critic", "one model"])
def test_guided_sampling_with_eta_draws_the_kl_optimal_policy(mdp, separate):
    """pi*(a1, a2) = pi_ref(a1) pi_ref(a2) exp(r(a1, a2) / eta) / Z: the frequencies of 6,000 guided samples."""
    prompt, actions, policy, critic, reward, bins = mdp
    eta, n = 0.5, 6000
    # one model: the policy's own final state is the same everywhere (fixed logits), so its heads read block 1
    model = policy if separate else exact_critic(policy, prompt, actions, reward, bins, head_layer=1)
    set_seed(0)
    out = generate(model, torch.tensor([prompt] * n), critic=critic if separate else None, eta=eta, max_new_tokens=2,
                   eos_token_id=[], pad_token_id=0)
    pairs = out.sequences[:, len(prompt):]
    pi = torch.softmax(PI_LOGITS.double(), 0)
    target = pi[:, None] * pi[None, :] * torch.exp(reward.double() / eta)
    target /= target.sum()
    index = {a: i for i, a in enumerate(actions)}
    counts = torch.zeros(3, 3, dtype=torch.float64)
    for a1, a2 in pairs.tolist():
        counts[index[a1], index[a2]] += 1
    freq = counts / n
    assert (freq - target).abs().max() < 4.5 * (target * (1 - target) / n).sqrt().max()
    chi2 = ((counts - n * target) ** 2 / (n * target)).sum()
    assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001
    plain = torch.softmax(PI_LOGITS.double(), 0)
    assert (freq - plain[:, None] * plain[None, :]).abs().max() > 0.05  # the guidance did move the distribution


def test_eta_needs_a_distributional_critic_and_excludes_another_beta(tokenizer):
    model = fixed_advantage_model(tokenizer, torch.zeros(len(tokenizer)))
    ids = tokenizer(["ab"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="eta= needs a distributional critic"):
        generate(model, ids, eta=0.5)
    model.tokenq_config.value_link = "sigmoid"
    with pytest.raises(ValueError, match=r"eta=0.5 steers with beta = 1/eta = 2; got beta=3"):
        generate(model, ids, eta=0.5, beta=3.0)
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        generate(model, ids, eta=0.0)
    assert generate(model, ids, eta=0.5, beta=2.0, max_new_tokens=2).sequences.shape == (1, ids.shape[1] + 2)
