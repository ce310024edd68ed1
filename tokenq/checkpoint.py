"""Save / load a `TokenQModel` as a plain folder (or Hub repo) of standard files.

Layout (every file loadable by its own library, no `trust_remote_code`):
- full or frozen backbone: `config.json` + `model*.safetensors` (what `AutoModelForCausalLM` reads);
  a frozen backbone loaded from a Hub id / folder is stored as a reference to it instead of a copy;
- LoRA backbone: `adapter_config.json` + `adapter_model.safetensors` (what peft reads); the base model is
  a reference, or a copy in `base_model/` when it was built from a config and exists nowhere else;
- `tokenq_heads.safetensors` (V, Q and target Q heads), `tokenq_config.json`, the tokenizer files.

Writes go to a temporary folder inside the target first and are moved into place file by file, so a
failure never leaves an existing checkpoint half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tokenq.heads import IQLHeads
from tokenq.modeling import TokenQConfig, TokenQModel

HEADS_FILE = "tokenq_heads.safetensors"
CONFIG_FILE = "tokenq_config.json"
BASE_DIR = "base_model"
FORMAT_VERSION = 1


def _base_model(backbone) -> torch.nn.Module:
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def _base_state_dict(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own weights from under injected LoRA layers (`x.base_layer.weight` -> `x.weight`;
    adapter and modules_to_save copies dropped): saving the wrapped model as is writes keys that reload
    into a re-initialised model (NOTES.md)."""
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def _backbone_record(model: TokenQModel) -> dict:
    backbone = model.backbone
    base = _base_model(backbone)
    source = base.config._name_or_path or None  # empty for a model built from a config
    mode = "lora" if isinstance(backbone, PeftModel) else "frozen" if not model.backbone_trainable else "full"
    quant = getattr(base.config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    return {
        "mode": mode,
        "base_model": source if mode != "full" and source else None,
        "quantization": quant,
        "dtype": str(base.dtype).removeprefix("torch."),
    }


def save_model(model: TokenQModel, save_directory: str | os.PathLike, tokenizer=None, is_main_process: bool = True) -> None:
    """Write `model` (and `tokenizer`) to `save_directory`; see the module docstring for the layout."""
    if not is_main_process:
        return
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    record = _backbone_record(model)
    with tempfile.TemporaryDirectory(dir=target, prefix=".tokenq-tmp-") as tmp:
        if record["mode"] == "lora":
            model.backbone.save_pretrained(tmp)
            if record["base_model"] is None:
                base = _base_model(model.backbone)
                base.save_pretrained(Path(tmp) / BASE_DIR, state_dict=_base_state_dict(base))
        elif record["base_model"] is None:  # full, or frozen without a source to point at
            model.backbone.save_pretrained(tmp)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()},
            Path(tmp) / HEADS_FILE,
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "heads": model.tokenq_config.to_dict(),
            "backbone": record,
            "hidden_size": model.heads.v.net[0].in_features,
            "vocab_size": model.unembed.shape[0],
        }
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        _move_into_place(Path(tmp), target)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Replace files one by one, then drop backbone weights of the other kind left by an earlier save."""
    written = set()
    for item in tmp.iterdir():
        dest = target / item.name
        if dest.is_dir() and item.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
        written.add(item.name)
    stale = [p for p in target.glob("model*.safetensors*") if p.name not in written]
    stale += [p for p in target.glob("adapter_*") if p.name not in written]
    for path in stale:
        path.unlink()


def _resolve(path_or_repo_id: str, revision: str | None, token: str | None) -> Path:
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    return Path(snapshot_download(path_or_repo_id, revision=revision, token=token))


def read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a tokenq checkpoint")
    return json.loads(file.read_text())


def _load_backbone(folder: Path, record: dict, is_trainable: bool, device_map, dtype):
    from tokenq.backbone import disable_bnb_cpu_inference_repack

    quant = record.get("quantization")
    kwargs = {"dtype": dtype or record.get("dtype") or "auto", "device_map": device_map}
    if quant is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(quant)
        kwargs["device_map"] = device_map or {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    if record["mode"] == "lora":
        base_path = record["base_model"] or str(folder / BASE_DIR)
        base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        disable_bnb_cpu_inference_repack(base)
        return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
    backbone = AutoModelForCausalLM.from_pretrained(record["base_model"] or str(folder), **kwargs)
    disable_bnb_cpu_inference_repack(backbone)
    return backbone


def load_model_from_checkpoint(
    path_or_repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    is_trainable: bool = False,
    device_map=None,
    dtype=None,
) -> TokenQModel:
    """Load a checkpoint folder or Hub repo written by `save_model`. Heads load strictly: a missing or
    unexpected tensor raises instead of leaving a head randomly initialised."""
    folder = _resolve(path_or_repo_id, revision, token)
    meta = read_config(folder)
    record = meta["backbone"]
    head_config = TokenQConfig(**meta["heads"])
    head_config.freeze_backbone = record["mode"] == "frozen"
    backbone = _load_backbone(folder, record, is_trainable, device_map, dtype)
    heads = IQLHeads(
        meta["hidden_size"], meta["vocab_size"], head_config.q_head, head_config.head_inner_size,
        head_config.num_q_heads, head_config.q_rank,
    )
    heads.load_state_dict(load_file(folder / HEADS_FILE), strict=True)
    model = TokenQModel(backbone, head_config, heads=heads.to(backbone.get_output_embeddings().weight.device))
    return model


def load_weights_in_place(model: TokenQModel, folder: str | os.PathLike) -> None:
    """Restore the weights of a checkpoint written by `save_model` into an already built `model` (used by
    `IQLTrainer` to resume: optimizer state refers to these very parameters)."""
    from accelerate.utils import load_checkpoint_in_model

    folder = Path(folder)
    record = read_config(folder)["backbone"]
    if record["mode"] == "lora":
        set_peft_model_state_dict(model.backbone, load_file(folder / "adapter_model.safetensors"))
    elif record["base_model"] is None:
        load_checkpoint_in_model(model.backbone, str(folder), strict=False)
    model.heads.load_state_dict(load_file(folder / HEADS_FILE), strict=True)
