"""save_pretrained / from_pretrained: lossless in every backbone mode, and clear errors for what does not fit."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from tests.conftest import tiny_gpt2, tiny_llama
from tokenq import IQLConfig, IQLTrainer
from tokenq.modeling import TokenQConfig, TokenQModel, build_model


def perturb(model: TokenQModel, seed: int = 1) -> None:
    """Make every trainable tensor and the targets non-trivial (LoRA B starts at 0, targets = online)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype.is_floating_point:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.update_targets(0.5)


def _outputs(model: TokenQModel, tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["ab cd", "b"], return_tensors="pt", padding=True)
    mask = enc.attention_mask.clone()
    mask[:, -1] = 0  # every position but the last acts
    model.eval()
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, mask)
        logits = model.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    return {"logits": logits, "v": out.values, "q": out.q_t, "q_lse": out.q_lse_t, "target_q": out.target_q_t}


def assert_same_outputs(a: TokenQModel, b: TokenQModel, tokenizer) -> None:
    """max |delta| = 0 on logits, V, Q and target Q, and on every tensor of the state dicts."""
    oa, ob = _outputs(a, tokenizer), _outputs(b, tokenizer)
    assert all((oa[k] - ob[k]).abs().max().item() == 0.0 for k in oa), {k: (oa[k] - ob[k]).abs().max().item() for k in oa}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) == 0.0


def _modes(llama_dir, tokenizer):
    from_config = AutoConfig.from_pretrained(llama_dir)  # its name_or_path still points at llama_dir
    lora = dict(use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    return {
        "full": lambda: TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(q_rank=8)),
        "full_mlp_layer1": lambda: TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(q_head="mlp", head_layer=1, head_inner_size=16)),
        "unembed": lambda: TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig(q_head="unembed", head_inner_size=16)),
        "frozen_pretrained": lambda: build_model(ModelConfig(model_name_or_path=llama_dir), TokenQConfig(freeze_backbone=True)),
        "frozen_from_config": lambda: build_model(ModelConfig(), TokenQConfig(freeze_backbone=True), config=from_config),
        "lora_pretrained": lambda: build_model(ModelConfig(model_name_or_path=llama_dir, **lora)),
        "lora_from_config": lambda: build_model(ModelConfig(**lora), config=from_config),
        "qlora_4bit": lambda: build_model(ModelConfig(model_name_or_path=llama_dir, load_in_4bit=True, **lora)),
    }


MODES = ["full", "full_mlp_layer1", "unembed", "frozen_pretrained", "frozen_from_config", "lora_pretrained",
         "lora_from_config", "qlora_4bit"]


@pytest.mark.parametrize("mode", MODES)
def test_save_load_save_is_lossless(mode, llama_dir, tokenizer, tmp_path):
    model = _modes(llama_dir, tokenizer)[mode]()
    perturb(model)
    model.save_pretrained(tmp_path / "a", tokenizer=tokenizer)
    once = TokenQModel.from_pretrained(str(tmp_path / "a"))
    assert_same_outputs(model, once, tokenizer)
    once.save_pretrained(tmp_path / "b")
    assert_same_outputs(model, TokenQModel.from_pretrained(str(tmp_path / "b")), tokenizer)
    assert once.tokenq_config == model.tokenq_config and once.backbone_trainable == (mode.startswith(("full", "unembed")))
    files = {p.name for p in (tmp_path / "a").iterdir()}
    by_reference = mode in ("frozen_pretrained", "lora_pretrained", "qlora_4bit")
    assert ("model.safetensors" in files or "base_model" in files) != by_reference
    assert not [k for k in model.state_dict() if k.startswith("_feature_module")]


def test_full_checkpoint_is_a_plain_hf_folder(gpt2, tokenizer, tmp_path):
    model = TokenQModel(gpt2, TokenQConfig())
    perturb(model)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert AutoTokenizer.from_pretrained(tmp_path)("abc").input_ids == tokenizer("abc").input_ids
    meta = json.loads((tmp_path / "tokenq_config.json").read_text())
    assert meta["backbone"]["mode"] == "full" and meta["backbone"]["model_type"] == "gpt2"
    assert model.config is gpt2.config and model.generate is not None


def test_failed_save_keeps_the_existing_checkpoint(gpt2, tmp_path, monkeypatch):
    model = TokenQModel(gpt2, TokenQConfig())
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    perturb(model)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tokenq.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before and not [p for p in tmp_path.iterdir() if p.name.startswith("_tokenq-tmp")]


def test_load_by_hub_id_from_the_hub_cache(gpt2, tokenizer, tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub's download calls (offline here: a populated cache)."""
    model = TokenQModel(gpt2, TokenQConfig())
    perturb(model)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tokenq-tiny"
    model.save_pretrained(repo / "snapshots" / commit, tokenizer=tokenizer)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = TokenQModel.from_pretrained("someone/tokenq-tiny", cache_dir=str(tmp_path / "hub"))
    assert_same_outputs(model, loaded, tokenizer)


# ---- what does not fit ---------------------------------------------------------------------------
def _saved(tmp_path, name, model):
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenq checkpoint"):
        TokenQModel.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenq checkpoint at ./does/not/exist: not a folder, and not a Hub repo id"):
        TokenQModel.from_pretrained("./does/not/exist")


@pytest.mark.parametrize("swap, message", [
    (lambda n: tiny_gpt2(n, n_embd=48), "heads need a backbone with hidden_size 32, the backbone loaded has 48"),
    (lambda n: tiny_gpt2(n + 3), "heads need a backbone with vocab_size"),
])
def test_from_pretrained_rejects_a_backbone_the_heads_do_not_fit(tokenizer, tmp_path, swap, message):
    folder = _saved(tmp_path, "ckpt", TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()))
    swap(len(tokenizer)).save_pretrained(folder)  # someone replaced the backbone files
    with pytest.raises(ValueError, match=f"tokenq_config.json: the {message}"):
        TokenQModel.from_pretrained(str(folder))


@pytest.mark.parametrize("file", ["tokenq_heads.safetensors", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_are_named(tokenizer, tmp_path, file, damage):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    folder = _saved(tmp_path, "ckpt", model)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 10)
    with pytest.raises(ValueError, match=f"{file}: corrupt or truncated safetensors file"):
        TokenQModel.from_pretrained(str(folder))
    with pytest.raises(ValueError, match=f"{file}: corrupt or truncated safetensors file"):
        model.load_checkpoint_weights(folder)


def test_a_changed_base_model_is_refused(tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_llama(len(tokenizer), seed=0).save_pretrained(base)
    model = build_model(ModelConfig(model_name_or_path=str(base)), TokenQConfig(freeze_backbone=True))
    folder = _saved(tmp_path, "ckpt", model)
    tiny_llama(len(tokenizer), seed=1).save_pretrained(base)  # the reference now holds other weights
    with pytest.raises(ValueError, match=r"tokenq_config.json: the base model .*base \(revision main\) does not hold the weights"):
        TokenQModel.from_pretrained(str(folder))


def _resume_cases(tokenizer):
    n = len(tokenizer)
    return {
        "heads": (lambda: TokenQModel(tiny_gpt2(n), TokenQConfig(q_head="mlp")), "heads.q_head: checkpoint 'low_rank', model 'mlp'"),
        "layers": (lambda: TokenQModel(tiny_gpt2(n, n_layer=3), TokenQConfig()), "backbone.num_hidden_layers: checkpoint 2, model 3"),
        "architecture": (lambda: TokenQModel(tiny_llama(n, hidden=32), TokenQConfig()), "backbone.model_type: checkpoint 'gpt2', model 'llama'"),
        "width": (lambda: TokenQModel(tiny_gpt2(n, n_embd=48), TokenQConfig()), "hidden_size: checkpoint 32, model 48"),
        "mode": (lambda: TokenQModel(tiny_gpt2(n), TokenQConfig(freeze_backbone=True)), "backbone.mode: checkpoint 'full', model 'frozen'"),
    }


@pytest.mark.parametrize("case", ["heads", "layers", "architecture", "width", "mode"])
def test_resume_rejects_a_checkpoint_that_does_not_fit_before_any_step(tokenizer, tmp_path, case):
    folder = _saved(tmp_path, "checkpoint-2", TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()))
    (folder / "trainer_state.json").write_text("{}")  # whole as a training checkpoint: the model is what does not fit
    torch.save({}, folder / "optimizer.pt")
    build, message = _resume_cases(tokenizer)[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = IQLConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=2)
    trainer = IQLTrainer(model, args, Dataset.from_list([{"prompt": "ab", "completion": "cd", "reward": 1.0}] * 4), tokenizer)
    with pytest.raises(ValueError, match=f"checkpoint-2/tokenq_config.json: this checkpoint does not fit .*{message}"):
        trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_rejects_backbone_weights_of_another_shape(tokenizer, tmp_path):
    """Same tokenq_config, but the weights file itself has other keys / shapes."""
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    folder = _saved(tmp_path, "ckpt", model)
    other = tiny_gpt2(len(tokenizer))
    other.transformer.wpe = torch.nn.Embedding(32, 32)  # n_positions 64 -> 32
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: does not fit the model \(shape mismatch: transformer.wpe.weight \(32, 32\) vs \(64, 32\)"):
        model.load_checkpoint_weights(folder)
