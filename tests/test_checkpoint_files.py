"""Versioned checkpoints and named files: `format_version` is read (newer: refused, 1: converted), unknown fields are
refused naming them, and every file a load reads — missing or truncated — is named in the error."""

import json
import shutil

import pytest
import torch
from trl import ModelConfig

from tests.conftest import tiny_gpt2
from tokenq.checkpoint import CONFIG_FILE
from tokenq.cli import run as tokenq
from tokenq.data import load_tokenizer
from tokenq.modeling import TokenQConfig, TokenQModel, build_model


@pytest.fixture
def saved(tokenizer, tmp_path):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    return model, tmp_path / "ckpt"


def _edit_config(folder, edit):
    meta = json.loads((folder / CONFIG_FILE).read_text())
    edit(meta)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))


def test_a_newer_format_is_refused(saved):
    _, folder = saved
    _edit_config(folder, lambda m: m.update(format_version=3))
    with pytest.raises(ValueError, match=r"tokenq_config.json: checkpoint format 3 was written by a newer tokenq; .*upgrade tokenq"):
        TokenQModel.from_pretrained(folder)
    _edit_config(folder, lambda m: m.pop("format_version"))
    with pytest.raises(ValueError, match=r"tokenq_config.json: no format_version"):
        TokenQModel.from_pretrained(folder)


def test_format_1_is_converted_and_loads_the_same_model(saved, tokenizer):
    model, folder = saved
    _edit_config(folder, lambda m: (m.update(format_version=1), [m["backbone"].pop(k) for k in
                 ("base_revision", "base_fingerprint", "model_type", "architectures", "num_hidden_layers")]))
    loaded = TokenQModel.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 6, 7]])
    mask = torch.ones_like(ids)
    assert torch.equal(loaded(ids, mask, mask).values, model(ids, mask, mask).values)
    fresh = TokenQModel(tiny_gpt2(len(tokenizer), seed=1), TokenQConfig())
    fresh.load_checkpoint_weights(folder)  # resuming from a format-1 checkpoint: shapes still checked
    assert torch.equal(fresh.state_dict()["heads.v.net.0.weight"], model.state_dict()["heads.v.net.0.weight"])


@pytest.mark.parametrize("where, name", [("heads", "heads.q_temperature"), ("backbone", "backbone.rope_scaling"),
                                         (None, "training_recipe")])
def test_unknown_fields_are_refused_by_name(saved, where, name):
    _, folder = saved
    _edit_config(folder, lambda m: (m[where] if where else m).update({name.split(".")[-1]: 1}))
    with pytest.raises(ValueError, match=rf"tokenq_config.json: field\(s\) this tokenq release does not know: {name} "):
        TokenQModel.from_pretrained(folder)


FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "tokenq_config.json", "tokenq_heads.safetensors"]


def _load_everything(folder):
    TokenQModel.from_pretrained(folder)
    load_tokenizer(str(folder))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_every_file_the_load_reads_is_named(saved, tmp_path, damage):
    _, folder = saved
    # not checked: the card (not read) and the chat template (plain text: a cut template still parses)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "README.md", "chat_template.jinja"])
    for file in FILES:
        if damage == "missing" and file in ("generation_config.json", "tokenizer_config.json"):
            continue  # optional: transformers loads without them
        broken = shutil.copytree(folder, tmp_path / f"{damage}-{file}")
        if damage == "missing":
            (broken / file).unlink()
        else:
            data = (broken / file).read_bytes()
            (broken / file).write_bytes(data[: len(data) // 2])
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            _load_everything(broken)
        assert file in str(e.value).replace(str(broken), ""), (file, str(e.value))


def test_lora_adapter_files_are_named(llama_dir, tmp_path):
    model = build_model(ModelConfig(model_name_or_path=llama_dir, use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "ckpt")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        for damage in ("missing", "truncated"):
            broken = shutil.copytree(tmp_path / "ckpt", tmp_path / f"{damage}-{file}")
            if damage == "missing":
                (broken / file).unlink()
            else:
                (broken / file).write_bytes((broken / file).read_bytes()[:40])
            with pytest.raises((FileNotFoundError, ValueError)) as e:
                TokenQModel.from_pretrained(broken)
            assert file in str(e.value).replace(str(broken), ""), (file, damage, str(e.value))


def test_tokenq_generate_names_a_missing_tokenizer(saved):
    _, folder = saved
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt has no tokenizer \(none of tokenizer.json, tokenizer_config.json"):
        tokenq(["generate", str(folder), "--prompt", "ab"])


def test_a_pytorch_model_bin_base_still_loads_and_saves(tokenizer, tmp_path):
    """A base model in the older `pytorch_model.bin` format: trained on (frozen, by reference) and reloaded."""
    base = tiny_gpt2(len(tokenizer))
    base.config.save_pretrained(tmp_path / "base")
    torch.save(base.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    model = build_model(ModelConfig(model_name_or_path=str(tmp_path / "base")), TokenQConfig(freeze_backbone=True))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = TokenQModel.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 5, 6]])
    mask = torch.ones_like(ids)
    assert torch.equal(loaded(ids, mask, mask).values, model(ids, mask, mask).values)
