"""ValueTrainer (Monte-Carlo values / Q-probes) and DQOTrainer on tiny known problems."""

import pytest
import torch
from datasets import Dataset
from trl import ModelConfig

from tokenq.modeling import build_model
from tokenq.mdp import TokenCollator, tokenize_dataset
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import DQOConfig, DQOTrainer, ValueConfig, ValueTrainer
from tests.conftest import tiny_gpt2

# completion "x..." succeeds 3 times in 4, "y..." once in 4: P(success | first token) = 0.75 / 0.25
ROWS = [{"prompt": "q", "completion": first + "z", "reward": r}
        for first, rewards in (("x", [1.0, 1.0, 1.0, 0.0]), ("y", [1.0, 0.0, 0.0, 0.0])) for r in rewards] * 4


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                per_device_train_batch_size=32, logging_steps=50, seed=0, dataloader_pin_memory=False)
    return cls(**{**base, **kw})


def _features_after_first_token(model, tokenizer):
    ds = tokenize_dataset(Dataset.from_list([{"prompt": "q", "completion": c + "z", "reward": 0.0} for c in "xy"]), tokenizer)
    batch = TokenCollator(0)([ds[0], ds[1]])
    model.eval()
    with torch.no_grad(), model.reading_features() as tap:
        model.backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    return tap.pop()[:, 1]  # the state after the first completion token


def _values_after_first_token(model, tokenizer):
    return model.state_value(_features_after_first_token(model, tokenizer))


@pytest.mark.parametrize("loss", ["mse", "bce", "categorical"])
def test_monte_carlo_linear_probe_on_an_intermediate_layer_of_a_frozen_backbone(tokenizer, tmp_path, loss):
    """The success probabilities 0.75 / 0.25: as a regression, a Bernoulli (BCE), or a categorical over the atoms {0, 1}
    (whose Q_eta then equals the Bernoulli's)."""
    bins = 2 if loss == "categorical" else 0
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=0), TokenQConfig(head_layer=1, head_inner_size=0, freeze_backbone=True,
                                                                        return_bins=bins))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    ValueTrainer(model, _args(ValueConfig, tmp_path, max_steps=300, learning_rate=0.05, value_loss=loss),
                 Dataset.from_list(ROWS), tokenizer).train()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    assert model.tokenq_config.value_link == ("sigmoid" if loss == "bce" else "identity")
    v = _values_after_first_token(model, tokenizer)
    assert v.tolist() == pytest.approx([0.75, 0.25], abs=0.05)  # probabilities for bce (sigmoid link)
    if loss == "categorical":
        p = torch.tensor([0.75, 0.25])
        q_eta = model.decoding_v(0.5)(_features_after_first_token(model, tokenizer))
        assert q_eta.tolist() == pytest.approx((0.5 * torch.log(1 - p + p * torch.e ** 2)).tolist(), abs=0.03)


def test_return_bins_go_with_the_categorical_loss_only(tokenizer, tmp_path):
    from tokenq.trainers import IQLConfig, IQLTrainer

    rows = Dataset.from_list(ROWS)
    binned = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(return_bins=3))
    with pytest.raises(ValueError, match="trained by tokenq value .*not by IQLTrainer"):
        IQLTrainer(binned, _args(IQLConfig, tmp_path, max_steps=1), rows, tokenizer)
    with pytest.raises(ValueError, match="--value_loss categorical and --return_bins K"):
        ValueTrainer(binned, _args(ValueConfig, tmp_path, max_steps=1, value_loss="bce"), rows, tokenizer)
    with pytest.raises(ValueError, match="--value_loss categorical and --return_bins K"):
        ValueTrainer(TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()),
                     _args(ValueConfig, tmp_path, max_steps=1, value_loss="categorical"), rows, tokenizer)
    with pytest.raises(ValueError, match="return_bins must be 0 or >= 2"):
        TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(return_bins=1))


def test_dqo_moves_the_policy_towards_rewarded_actions_with_a_shared_lora_reference(tokenizer, tmp_path, llama_dir):
    model = build_model(ModelConfig(model_name_or_path=llama_dir, use_peft=True, lora_r=8,
                                    lora_target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]), TokenQConfig())
    rows = [{"prompt": "q", "completion": c, "reward": r} for c, r in (("x", 1.0), ("y", 0.0))] * 16
    trainer = DQOTrainer(model, _args(DQOConfig, tmp_path, max_steps=60, learning_rate=1e-2, beta=0.5),
                         Dataset.from_list(rows), tokenizer)
    assert trainer.ref_model is None and trainer.shares_reference
    ids = tokenizer(["q"], return_tensors="pt").input_ids
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])

    def log_probs(adapter: bool):
        with torch.no_grad():
            if adapter:
                logits = model.backbone(ids).logits
            else:
                with model.backbone.disable_adapter():
                    logits = model.backbone(ids).logits
        return torch.log_softmax(logits[0, -1], -1)

    ref_before = log_probs(adapter=False)
    trainer.train()
    policy, ref_after = log_probs(adapter=True), log_probs(adapter=False)
    assert torch.allclose(ref_before, ref_after)  # the reference is the base model, untouched
    # the policy shifts towards the rewarded first token. (How far is not pinned by data that covers one action
    # per state: V(s_x) and the log-ratio of the EOS after x trade off, bounded by pi_ref(EOS | s_x), which
    # is ~1/52 for this random reference and ~1 for a reference trained on the data.)
    gain = (policy[x] - policy[y]) - (ref_after[x] - ref_after[y])
    assert gain.item() > 0.2


def test_dqo_full_fine_tuning_keeps_a_frozen_reference_copy(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    trainer = DQOTrainer(model, _args(DQOConfig, tmp_path, max_steps=3, logging_steps=1), Dataset.from_list(ROWS), tokenizer)
    ref = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.ref_model.state_dict()[k]) for k, v in ref.items())
    assert not any(torch.equal(p, trainer.ref_model.state_dict()[k]) for k, p in model.backbone.state_dict().items() if "wte" in k)
    assert {"loss/policy", "loss/v", "logratio/mean", "weight/mean"} <= set(trainer.state.log_history[0])
