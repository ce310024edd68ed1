"""TokenQModel: one forward for logits and heads, layer choice, frozen / LoRA / 4-bit backbones."""

import pytest
import torch
from datasets import Dataset
from trl import ModelConfig

from tokenq.modeling import build_model
from tokenq.mdp import TokenCollator, tokenize_dataset
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.trainers import IQLConfig, IQLTrainer
from tests.conftest import tiny_gpt2


def _batch(tokenizer):
    rows = [{"prompt": "ab", "completion": "cde", "reward": 1.0}, {"prompt": "a", "completion": "b", "reward": 0.0}]
    ds = tokenize_dataset(Dataset.from_list(rows), tokenizer)
    return TokenCollator(tokenizer.pad_token_id)([ds[0], ds[1]])


@pytest.mark.parametrize("layer, hidden_index", [(-1, -1), (1, 1)])
def test_heads_read_the_configured_layer(gpt2, tokenizer, layer, hidden_index):
    model = TokenQModel(gpt2, TokenQConfig(head_layer=layer))
    batch = _batch(tokenizer)
    out = model(batch["input_ids"], batch["attention_mask"], batch["action_mask"])
    ref = gpt2(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    h = ref.hidden_states[hidden_index]
    assert torch.allclose(out.values, model.heads.v(h), atol=1e-6)
    n_actions = int(batch["action_mask"].sum())
    assert out.q_t.shape == out.q_lse_t.shape == (2, n_actions)
    q_all = model.heads.q_values(h[batch["action_mask"].bool()], model.unembed)
    assert torch.allclose(out.q_lse_t, torch.logsumexp(q_all, -1), atol=1e-5)
    assert out.target_q_t.shape == (2, n_actions) and out.logits_t.shape == (n_actions, len(tokenizer))
    assert out.a_t.tolist() == batch["input_ids"].roll(-1, 1)[batch["action_mask"].bool()].tolist()
    assert torch.allclose(out.logits_t, ref.logits[batch["action_mask"].bool()], atol=1e-5)
    no_cql = model(batch["input_ids"], batch["attention_mask"], batch["action_mask"], q_logsumexp=False)
    assert no_cql.q_lse_t is None and torch.equal(no_cql.q_t, out.q_t)  # CQL off: no vocabulary-wide pass


def _gemma2_with_softcapping(vocab_size: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                          pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return Gemma2ForCausalLM(config)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_logits_at_equals_the_full_forward_at_those_positions(tokenizer, arch):
    """Rows act at different positions (one row has none); logits there equal the full forward's, post-
    processing included (Gemma 2 soft-caps its logits at 2.0 after the LM head); None: no logits at all."""
    from tests.conftest import tiny_llama
    from tokenq.modeling import logits_at

    backbone = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma2": _gemma2_with_softcapping}[arch](len(tokenizer)).eval()
    ids = torch.randint(2, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, 2:6], positions[2, [1, 3]] = True, True
    full = backbone(input_ids=ids, attention_mask=mask).logits
    with logits_at(backbone, positions):
        selected = backbone(input_ids=ids, attention_mask=mask).logits
    assert selected.shape == (1, 6, len(tokenizer))
    assert torch.allclose(selected[0], full[positions], atol=1e-5)
    if arch == "gemma2":
        assert full.abs().max() < 2.0 and selected.abs().max() < 2.0
    with logits_at(backbone, None):
        assert backbone(input_ids=ids, attention_mask=mask).logits.numel() == 0
    assert torch.equal(backbone(input_ids=ids, attention_mask=mask).logits, full)  # the hook is gone after the block


def test_a_frozen_backbone_step_computes_no_lm_logits(gpt2, tokenizer, tmp_path):
    """IQL on a frozen LM: the LM head sees no rows (the BC term would be a constant), the heads still learn."""
    model = TokenQModel(gpt2, TokenQConfig(freeze_backbone=True))
    rows = []
    model.backbone.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    grads = _loss_grads(model, tokenizer, tmp_path)
    assert rows == [0] and grads["heads.q.0.embedding"].abs().sum() > 0


def test_bad_head_layer(gpt2):
    with pytest.raises(ValueError, match="head_layer"):
        TokenQModel(gpt2, TokenQConfig(head_layer=7))


def _loss_grads(model, tokenizer, tmp_path):
    args = IQLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = IQLTrainer(model, args, Dataset.from_list([{"prompt": "ab", "completion": "cd", "reward": 1.0}] * 2), tokenizer)
    batch = _batch(tokenizer)
    model.train()
    trainer.compute_loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_backbone_trains_heads_only(gpt2, tokenizer, tmp_path):
    model = TokenQModel(gpt2, TokenQConfig(freeze_backbone=True))
    grads = _loss_grads(model, tokenizer, tmp_path)
    assert grads and all(n.startswith("heads.") for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("heads.target"))


def test_4bit_qlora_every_trainable_parameter_gets_a_gradient_after_eval(llama_dir, tokenizer, tmp_path):
    """bitsandbytes 0.50: on avx512_bf16 CPUs an eval-mode forward repacks 4-bit weights and LoRA below them
    silently stops getting gradients. tokenq disables the repack on every Linear4bit."""
    import bitsandbytes as bnb

    model_args = ModelConfig(model_name_or_path=llama_dir, load_in_4bit=True, use_peft=True, lora_r=4,
                             lora_target_modules=["q_proj", "v_proj", "down_proj"])
    model = build_model(model_args, TokenQConfig())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = _batch(tokenizer)
    model.eval()
    with torch.no_grad():  # the eval pass that triggers the repack
        model(batch["input_ids"], batch["attention_mask"], batch["action_mask"])
        model.backbone.generate(batch["input_ids"][:1, :2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    grads = _loss_grads(model, tokenizer, tmp_path)
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert len(lora) == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing, f"no gradient for {missing}"
    assert all(g.abs().sum() > 0 for n, g in lora.items() if "lora_A" not in n)  # B starts at 0; A's grad is 0


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_activation_checkpointing_gives_the_same_gradients(llama_dir, tokenizer, tmp_path, mode):
    lora = dict(use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]) if mode != "full" else {}
    model = build_model(ModelConfig(model_name_or_path=llama_dir, load_in_4bit=mode == "qlora", **lora), TokenQConfig())
    plain = _loss_grads(model, tokenizer, tmp_path)
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.supports_gradient_checkpointing
    checkpointed = _loss_grads(model, tokenizer, tmp_path)
    assert plain.keys() == checkpointed.keys() and any("backbone" in k for k in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None and torch.allclose(grad, checkpointed[name], atol=1e-6), name
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_model_fits_the_hf_stack(gpt2, tokenizer):
    model = TokenQModel(gpt2, TokenQConfig())
    assert model.config is gpt2.config
    assert not [k for k in model.state_dict() if not k.startswith(("backbone.", "heads."))]  # LM head once
    enc = tokenizer(["ab"], return_tensors="pt")
    out = model.generate(**enc, strategy="greedy", beta=1.0, max_new_tokens=3, pad_token_id=0)
    assert out.sequences.shape == (1, enc.input_ids.shape[1] + 3)


def test_a_frozen_backbone_stays_in_eval_mode(tokenizer):
    """No dropout on the features of a frozen backbone, even when the model trains (as decoding reads them)."""
    backbone = tiny_gpt2(len(tokenizer))
    backbone.config.resid_pdrop = backbone.config.embd_pdrop = 0.5
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model = TokenQModel(backbone, TokenQConfig(freeze_backbone=True)).train()
    assert model.training and model.heads.training and not model.backbone.training
    batch = _batch(tokenizer)
    first = model(batch["input_ids"], batch["attention_mask"], batch["action_mask"]).values
    assert torch.equal(first, model(batch["input_ids"], batch["attention_mask"], batch["action_mask"]).values)
