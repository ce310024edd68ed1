"""What a tokenq checkpoint must satisfy before a weight is touched: readable safetensors files (a corrupt or
truncated one raises naming it), a referenced base model with the fingerprinted weights, a backbone the heads
fit, and — to resume — a checkpoint written by a model built like this one, key by key and shape by shape."""

from __future__ import annotations

import contextlib
import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor

from tokenq.backbone import base_model_of
from tokenq.heads import TokenQConfig

# tokenq_config.json's format. 1: the first layout (backbone: mode, base_model, quantization, dtype);
# 2: the backbone record also says its base revision and weights fingerprint, model type, architectures and depth.
FORMAT_VERSION = 2
_FIELDS = {"format_version", "heads", "backbone", "hidden_size", "vocab_size"}
_BACKBONE_FIELDS = {"mode", "base_model", "base_revision", "base_fingerprint", "quantization", "dtype", "model_type",
                    "architectures", "num_hidden_layers"}
_ADDED_IN_2 = ("base_revision", "base_fingerprint", "model_type", "architectures", "num_hidden_layers")

_HEAD_SHAPE_FIELDS = ("head_layer", "q_head", "q_rank", "head_inner_size", "num_q_heads", "return_bins")
_HEAD_FIELDS_ADDED = {"return_bins": 0}  # head fields newer than a checkpoint: what it was built with


@contextlib.contextmanager
def _opened(file: Path):
    """`safe_open(file)`; a corrupt or truncated file raises naming it (transformers' and peft's errors do not)."""
    try:
        with safe_open(file, "pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, corrupt or truncated file raises naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    with _opened(file) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_json(file: Path):
    """A JSON file's content; a truncated or malformed one raises naming it (json's own error names no file)."""
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is truncated or not valid JSON ({e})") from e


def listed(names: list[str], most: int = 5) -> str:
    """The first `most` names, comma-separated, with " ..." when there are more."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def nonfinite_names(named: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `named` that hold a NaN or an infinity (a sharded DTensor:
    this process's shard)."""
    floats = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in named.items()
              if v is not None and torch.is_floating_point(v)}
    if not floats:
        return []
    finite = torch.stack([v.detach().isfinite().all() for v in floats.values()]).tolist()
    return [k for k, ok in zip(floats, finite) if not ok]


def check_finite(named: dict[str, torch.Tensor], file: Path) -> None:
    """A checkpoint's weights (read from `file`) are finite: a diverged run's NaN weights are refused, not loaded."""
    bad = nonfinite_names(named)
    if bad:
        raise ValueError(f"{file}: {len(bad)} tensor(s) hold non-finite values (NaN / inf): {listed(bad)} — written by "
                         "a run that diverged")


def check_safetensors(folder: Path) -> None:
    """Open the header of every safetensors file transformers / peft are about to read (fails fast)."""
    for file in sorted(folder.glob("*.safetensors")):
        with _opened(file):
            pass


def check_fingerprint(config_file: Path, record: dict, fingerprint: str) -> None:
    expected = record.get("base_fingerprint")
    if expected is not None and fingerprint != expected:
        raise ValueError(
            f"{config_file}: the base model {record['base_model']} (revision {record.get('base_revision') or 'main'}) "
            f"does not hold the weights this checkpoint was trained on (fingerprint {fingerprint}, "
            f"expected {expected}): pin the revision it was trained from"
        )


def check_backbone_fits(config_file: Path, meta: dict, backbone) -> None:
    """The loaded backbone has the width and vocabulary the heads were trained for."""
    text = base_model_of(backbone).config.get_text_config()
    vocab = backbone.get_output_embeddings().weight.shape[0]
    for name, have, want in (("hidden_size", text.hidden_size, meta["hidden_size"]), ("vocab_size", vocab, meta["vocab_size"])):
        if have != want:
            raise ValueError(f"{config_file}: the heads need a backbone with {name} {want}, the backbone loaded has {have}")


def check_fits(config_file: Path, meta: dict, mine: dict) -> None:
    """A checkpoint to resume from was written by a model built like this one."""
    theirs_heads = {**_HEAD_FIELDS_ADDED, **meta["heads"]}
    problems = [f"heads.{k}: checkpoint {theirs_heads.get(k)!r}, model {mine['heads'][k]!r}"
                for k in _HEAD_SHAPE_FIELDS if theirs_heads.get(k) != mine["heads"][k]]
    theirs = meta["backbone"]
    for key in ("mode", "model_type", "num_hidden_layers"):
        if theirs.get(key) is not None and theirs[key] != mine["backbone"][key]:  # None: unknown (format 1)
            problems.append(f"backbone.{key}: checkpoint {theirs[key]!r}, model {mine['backbone'][key]!r}")
    for key in ("hidden_size", "vocab_size"):
        if meta[key] != mine[key]:
            problems.append(f"{key}: checkpoint {meta[key]}, model {mine[key]}")
    if problems:
        raise ValueError(f"{config_file}: this checkpoint does not fit the model being trained: " + "; ".join(problems))


def check_config(meta: dict, file: Path) -> dict:
    """`tokenq_config.json`'s content, checked and brought to the current format: a newer format than this release
    reads is refused (upgrade tokenq), format 1 is converted (the fields format 2 added are unknown: None, so the
    checks that need them are skipped), and a field this release does not know is refused, naming it — a
    checkpoint is never read with part of what it says ignored."""
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise ValueError(f"{file}: no format_version: not a tokenq checkpoint config")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file}: checkpoint format {version} was written by a newer tokenq; this release reads "
                         f"formats 1-{FORMAT_VERSION}: upgrade tokenq (pip install -U tokenq)")
    if version < 1:
        raise ValueError(f"{file}: unknown checkpoint format {version}")
    missing = sorted(_FIELDS - set(meta)) + [f"backbone.{k}" for k in ("mode", "base_model") if k not in meta.get("backbone", {})]
    if missing:
        raise ValueError(f"{file}: missing field(s) {', '.join(missing)} (format {version})")
    meta = {**meta, "backbone": dict(meta["backbone"])}
    if version == 1:
        for key in _ADDED_IN_2:
            meta["backbone"].setdefault(key, None)
    unknown = sorted(set(meta) - _FIELDS) + [f"backbone.{k}" for k in sorted(set(meta["backbone"]) - _BACKBONE_FIELDS)]
    unknown += [f"heads.{k}" for k in sorted(set(meta["heads"]) - {f.name for f in fields(TokenQConfig)})]
    if unknown:
        raise ValueError(f"{file}: field(s) this tokenq release does not know: {', '.join(unknown)} (format {version}; "
                         "written by another tokenq version? upgrade tokenq, or remove them if you added them)")
    return meta


def _storage(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def check_shapes(state: dict, expected: dict, file: Path, strict_missing: bool) -> None:
    """Same keys (tied weights aside) and shapes as the model's own state dict, else an error naming the file."""
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in state
             if k in expected and state[k].shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    if not strict_missing and missing:  # a tied weight (lm_head <- embedding) is saved once
        saved = {_storage(expected[k]) for k in state if k in expected}
        missing = [k for k in missing if _storage(expected[k]) not in saved]
    problems = [f"{label}: {listed(items)}"
                for label, items in (("shape mismatch", wrong), ("unexpected", unexpected), ("missing", missing)) if items]
    if problems:
        raise ValueError(f"{file}: does not fit the model ({'; '.join(problems)})")


def load_strict(module: torch.nn.Module, state: dict, file: Path) -> None:
    check_shapes(state, module.state_dict(), file, strict_missing=True)
    module.load_state_dict(state, strict=True)
