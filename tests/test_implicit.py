"""Implicit rewards and Q from a policy / reference pair (Rafailov et al. 2024)."""

import pytest
import torch
from datasets import Dataset

from tokenq.implicit import implicit_q_generate, implicit_token_rewards, token_log_probs, with_implicit_rewards
from tokenq.mdp import TokenCollator, tokenize_dataset
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import IQLConfig, IQLTrainer
from tests.conftest import tiny_gpt2
from tests.test_generation import left_padded


def test_expected_implicit_reward_under_the_reference_is_minus_beta_kl(tokenizer):
    policy, reference = tiny_gpt2(len(tokenizer), seed=1).eval(), tiny_gpt2(len(tokenizer), seed=2).eval()
    ids = tokenizer(["abcde", "hello"], return_tensors="pt").input_ids
    with torch.no_grad():
        logp, logq = (torch.log_softmax(m(ids).logits, -1) for m in (policy, reference))
    beta = 0.3
    expected_reward = (logq.exp() * beta * (logp - logq)).sum(-1)  # E_{a ~ pi_ref}[beta log(pi / pi_ref)(a|s)]
    kl = torch.nn.functional.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # KL(pi_ref || pi)
    assert torch.allclose(expected_reward, -beta * kl, atol=1e-6)
    assert (kl > 0).all()


def test_token_rewards_sum_to_the_sequence_log_ratio(tokenizer):
    policy, reference = tiny_gpt2(len(tokenizer), seed=1).eval(), tiny_gpt2(len(tokenizer), seed=2).eval()
    ds = tokenize_dataset(Dataset.from_list([{"prompt": "ab", "completion": "cde", "reward": 0.0}]), tokenizer)
    batch = TokenCollator(0)([ds[0]])
    r = implicit_token_rewards(policy, reference, batch["input_ids"], batch["attention_mask"], batch["action_mask"], 0.5)
    ratio = token_log_probs(policy, batch["input_ids"], batch["attention_mask"]) - token_log_probs(reference, batch["input_ids"], batch["attention_mask"])
    assert r[0, 0] == 0 and r.sum().item() == pytest.approx(0.5 * ratio[0, 1:5].sum().item(), rel=1e-5)
    relabelled = with_implicit_rewards(ds, policy, reference, 0, beta=0.5)
    assert relabelled[0]["rewards"] == pytest.approx(r[0].tolist(), abs=1e-6)


def test_implicit_rewards_train_iql(tokenizer, tmp_path):
    policy, reference = tiny_gpt2(len(tokenizer), seed=1).eval(), tiny_gpt2(len(tokenizer), seed=2).eval()
    rows = [{"prompt": "ab", "completion": c, "reward": 0.0} for c in ("cd", "ce", "dd")]
    data = with_implicit_rewards(tokenize_dataset(Dataset.from_list(rows), tokenizer), policy, reference, 0, beta=0.1)
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    args = IQLConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, report_to="none", use_cpu=True,
                     save_strategy="no", disable_tqdm=True)
    assert IQLTrainer(model, args, data, tokenizer).train().global_step == 2


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=False, num_beams=3)])
def test_implicit_q_at_weight_one_over_beta_decodes_the_policy(tokenizer, kw):
    policy, reference = tiny_gpt2(len(tokenizer), seed=1).eval(), tiny_gpt2(len(tokenizer), seed=2).eval()
    enc = left_padded(tokenizer, ["abc", "x"])
    common = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=0, **kw)
    ours = implicit_q_generate(policy, reference, enc.input_ids, enc.attention_mask, beta=0.25, top_k=len(tokenizer), **common)
    assert torch.equal(ours, policy.generate(**enc, **common))
    # weight 0 is the reference itself
    ref = implicit_q_generate(policy, reference, enc.input_ids, enc.attention_mask, beta=0.25, weight=0.0, top_k=len(tokenizer), **common)
    assert torch.equal(ref, reference.generate(**enc, **common))
