"""Sharing on the Hub with only the network edge faked (tests/fake_hub.py): push, card, load back."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from trl import ModelConfig

from tests.conftest import tiny_gpt2
from tests.test_checkpoint import assert_same_outputs, perturb
from tokenq import IQLConfig, IQLTrainer, TokenQConfig, TokenQModel, build_model

BACKBONE = {"config.json", "generation_config.json", "model.safetensors"}
TOKENQ = {"tokenq_config.json", "tokenq_heads.safetensors", "README.md"}


def _tokenizer_files(tokenizer, tmp_path) -> set[str]:
    folder = tmp_path / "tokenizer_only"
    tokenizer.save_pretrained(folder)
    return {p.name for p in folder.iterdir()}


def test_push_to_hub_round_trip_and_card(gpt2, tokenizer, tmp_path, fake_hub):
    model = TokenQModel(gpt2, TokenQConfig(q_rank=8))
    perturb(model)
    model.push_to_hub("someone/tiny-q", tokenizer=tokenizer)
    (commit,) = fake_hub.commits
    assert set(commit.files) == BACKBONE | TOKENQ | _tokenizer_files(tokenizer, tmp_path)

    loaded = TokenQModel.from_pretrained("someone/tiny-q")
    assert_same_outputs(model, loaded, tokenizer)
    assert set(fake_hub.downloads) == BACKBONE | TOKENQ - {"README.md"}  # not the card, not the tokenizer

    card = ModelCard.load(fake_hub.root / "repos" / "someone/tiny-q" / "README.md")
    assert card.data.library_name == "tokenq" and card.data.pipeline_tag == "text-generation"
    assert {"tokenq", "value-head", "q-guided-decoding"} <= set(card.data.tags) and card.data.license == "apache-2.0"
    assert 'TokenQModel.from_pretrained("someone/tiny-q")' in card.text and "low-rank Q head" in card.text


def test_load_by_revision(gpt2, tokenizer, fake_hub):
    model = TokenQModel(gpt2, TokenQConfig())
    first = model.push_to_hub("someone/rev", tokenizer=tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model)
    model.push_to_hub("someone/rev")
    old = TokenQModel.from_pretrained("someone/rev", revision=first.oid)
    assert all(torch.equal(before[k], v) for k, v in old.state_dict().items())


def test_lora_save_and_push_keeps_the_adapter_and_the_base_reference(llama_dir, tokenizer, tmp_path, fake_hub):
    model = build_model(ModelConfig(model_name_or_path=llama_dir, use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path / "local", tokenizer=tokenizer, push_to_hub=True, repo_id="someone/lora-q")
    files = fake_hub.repo_files("someone/lora-q")
    assert {"adapter_config.json", "adapter_model.safetensors"} | TOKENQ <= files and "model.safetensors" not in files
    assert_same_outputs(model, TokenQModel.from_pretrained("someone/lora-q"), tokenizer)


def _trainer(tokenizer, out, **overrides) -> IQLTrainer:
    rows = [{"prompt": "ab", "completion": "cd", "reward": 1.0}, {"prompt": "b", "completion": "a", "reward": 0.0}] * 4
    args = IQLConfig(output_dir=str(out), report_to="none", use_cpu=True, per_device_train_batch_size=4, max_steps=4,
                     save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id="someone/run",
                     disable_tqdm=True, **overrides)
    return IQLTrainer(TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()), args, Dataset.from_list(rows), tokenizer)


STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints", "end"])
def test_trainer_pushes_a_tokenq_checkpoint_every_time(tokenizer, tmp_path, fake_hub, strategy):
    trainer = _trainer(tokenizer, tmp_path / "out", hub_strategy=strategy)
    trainer.train()
    trainer.create_model_card(results={"metrics": {"reward": 0.5}})
    trainer.push_to_hub()
    root = BACKBONE | TOKENQ | _tokenizer_files(tokenizer, tmp_path) | {"training_args.bin"}
    ckpt = root | STATE
    expected = {
        "every_save": [root, root, root],
        "checkpoint": [root, {f"last-checkpoint/{f}" for f in ckpt}] * 2 + [root],
        "all_checkpoints": [root, {f"checkpoint-2/{f}" for f in ckpt}, root, {f"checkpoint-4/{f}" for f in ckpt}, root],
        "end": [root],
    }[strategy]
    assert [set(c.files) for c in fake_hub.commits] == expected
    for commit in fake_hub.commits:  # the repo root loads as a tokenq checkpoint after every push
        TokenQModel.from_pretrained("someone/run", revision=commit.oid)
    final = TokenQModel.from_pretrained("someone/run")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), trainer.model.state_dict().values()))
    card = ModelCard.load(fake_hub.root / "repos" / "someone/run" / "README.md")
    assert card.data.library_name == "tokenq" and "ilql" in card.data.tags
    assert "| reward | 0.5 |" in card.text and "| tau | 0.9 |" in card.text


def test_a_failed_push_leaves_the_local_checkpoint_and_is_reported(tokenizer, tmp_path, fake_hub, caplog):
    trainer = _trainer(tokenizer, tmp_path / "out", hub_strategy="every_save")
    fake_hub.fail_uploads = ConnectionError("network is down")
    with caplog.at_level(logging.ERROR, logger="tokenq"):
        trainer.train()
    assert "push to the Hub repo someone/run failed" in caplog.text and "network is down" in caplog.text
    assert "2 push(es) to the Hub failed during training" in caplog.text
    local = tmp_path / "out" / "checkpoint-4"
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    with pytest.raises(ConnectionError, match="network is down"):
        trainer.push_to_hub()
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before
    TokenQModel.from_pretrained(str(tmp_path / "out"))  # the final local save is complete
    assert fake_hub.commits == []


def test_card_names_a_hub_base_model(llama_dir, tokenizer, tmp_path):
    """A LoRA backbone on a base loaded from a Hub id: the card's `base_model` is that id."""
    from tokenq.backbone import mark_pretrained_source

    model = build_model(ModelConfig(model_name_or_path=llama_dir, use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
    mark_pretrained_source(model.backbone.get_base_model(), "someone/base-llama", "main")  # as if from the Hub
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "someone/base-llama" and "lora" in card.text
    assert json.loads((tmp_path / "tokenq_config.json").read_text())["backbone"]["base_model"] == "someone/base-llama"
