"""save_pretrained / from_pretrained round trips with max |delta| = 0 on every tensor."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from tokenq.modeling import build_model
from tokenq.modeling import TokenQConfig, TokenQModel
from tests.conftest import tiny_gpt2


def _perturb(model: TokenQModel, seed: int = 1) -> None:
    """Make every trainable tensor and the targets non-trivial (LoRA B starts at 0, targets = online)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype.is_floating_point:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.update_targets(0.5)


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst == 0.0


def test_full_round_trip(gpt2, tokenizer, tmp_path):
    model = TokenQModel(gpt2, TokenQConfig(q_head="low_rank", q_rank=8))
    _perturb(model)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    loaded = TokenQModel.from_pretrained(str(tmp_path))
    _assert_identical(model, loaded)
    assert loaded.tokenq_config == model.tokenq_config
    # the folder is a plain HF model folder too, with no trust_remote_code
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_identical(model.backbone, lm)
    assert AutoTokenizer.from_pretrained(tmp_path)("abc").input_ids == tokenizer("abc").input_ids
    assert json.loads((tmp_path / "tokenq_config.json").read_text())["backbone"]["mode"] == "full"


@pytest.mark.parametrize("q_head", ["mlp", "unembed"])
def test_other_heads_round_trip(gpt2, tmp_path, q_head):
    model = TokenQModel(gpt2, TokenQConfig(q_head=q_head, head_inner_size=16))
    _perturb(model)
    model.save_pretrained(tmp_path)
    _assert_identical(model, TokenQModel.from_pretrained(str(tmp_path)))


def test_lora_round_trip_references_the_base(llama_dir, tokenizer, tmp_path):
    model = build_model(ModelConfig(model_name_or_path=llama_dir, use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]), TokenQConfig())
    _perturb(model)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenq_heads.safetensors"} <= files
    assert "model.safetensors" not in files  # the base is a reference, not a copy
    loaded = TokenQModel.from_pretrained(str(tmp_path / "ckpt"))
    _assert_identical(model, loaded)


def test_lora_on_a_model_built_from_config_saves_the_base(tokenizer, tmp_path):
    config = tiny_gpt2(len(tokenizer)).config
    model = build_model(ModelConfig(use_peft=True, lora_r=4, lora_target_modules=["c_attn"]), TokenQConfig(), config=config)
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "base_model" / "config.json").is_file()
    _assert_identical(model, TokenQModel.from_pretrained(str(tmp_path)))


def test_frozen_pretrained_backbone_is_a_reference(llama_dir, tmp_path):
    model = build_model(ModelConfig(model_name_or_path=llama_dir), TokenQConfig(freeze_backbone=True))
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model*.safetensors"))
    loaded = TokenQModel.from_pretrained(str(tmp_path))
    _assert_identical(model, loaded)
    assert not loaded.backbone_trainable


def test_failed_save_keeps_the_existing_checkpoint(gpt2, tmp_path, monkeypatch):
    model = TokenQModel(gpt2, TokenQConfig())
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _perturb(model)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tokenq.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before and not [p for p in tmp_path.iterdir() if p.name.startswith("_tokenq-tmp")]


def test_load_by_hub_id_from_the_hub_cache(gpt2, tokenizer, tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub.snapshot_download (offline here: a populated cache)."""
    model = TokenQModel(gpt2, TokenQConfig())
    _perturb(model)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tokenq-tiny"
    model.save_pretrained(repo / "snapshots" / commit, tokenizer=tokenizer)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = TokenQModel.from_pretrained("someone/tokenq-tiny")
    _assert_identical(model, loaded)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenq checkpoint"):
        TokenQModel.from_pretrained(str(tmp_path))
