"""Persistence of a `TokenQModel`: a folder (or Hub repo) of standard files, saved, loaded and pushed.

`CheckpointMixin` is huggingface_hub's `ModelHubMixin` with its save / load hooks overridden to keep
tokenq's own folder layout. The mixin gives the contract HF users know (`from_pretrained(repo_id,
revision=, token=, cache_dir=, force_download=, local_files_only=)`, `push_to_hub`, `save_pretrained(...,
push_to_hub=True)`) and the class-level card metadata (`library_name="tokenq"`, tags, docs link).
`PyTorchModelHubMixin` is not used: it writes the model's init arguments as `config.json`, the very file
`AutoModelForCausalLM` reads from the same folder, and it loads weights with `strict=False`, so missing
heads would stay randomly initialised without a word.

The mixin sits beside the model: this module never imports `tokenq.modeling`; `TokenQModel` inherits
it and provides `backbone`, `heads`, `tokenq_config`, `unembed` and `backbone_trainable`.

Layout (every file loadable by its own library, no `trust_remote_code`):
- full backbone, or a frozen one with no source to point at: `config.json` + `model*.safetensors`
  (what `AutoModelForCausalLM` reads); a frozen backbone whose weights tokenq loaded from a Hub id or a
  folder, unchanged since, is stored as a reference to it (name, revision, weights fingerprint);
- LoRA backbone: `adapter_config.json` + `adapter_model.safetensors` (what peft reads); the base is a
  reference as above, or a copy in `base_model/`;
- `tokenq_heads.safetensors` (V, Q and target Q heads), `tokenq_config.json`, the tokenizer files and a
  model card (`README.md`).

Saves are whole or absent (`tokenq.atomic`): a new folder is written under a temporary name and renamed into
place; into an existing folder (a run's `output_dir`), the files are written to a temporary folder inside it and
moved into place with SIGINT / SIGTERM held back, so a failure never leaves a checkpoint half-overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelHubMixin, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tokenq.atomic import TMP_PREFIX, signals_deferred, staged_folder
from tokenq.backbone import (
    base_model_of, base_state_dict, disable_bnb_cpu_inference_repack, mark_pretrained_source, pretrained_source,
    weights_fingerprint,
)
from tokenq.card import build_model_card
from tokenq.checkpoint_checks import (
    FORMAT_VERSION, check_backbone_fits, check_config, check_finite, check_fingerprint, check_fits, check_safetensors,
    check_shapes, load_strict, read_json, read_tensors,
)
from tokenq.heads import IQLHeads, TokenQConfig

logger = logging.getLogger(__name__)

HEADS_FILE = "tokenq_heads.safetensors"
CONFIG_FILE = "tokenq_config.json"
BASE_DIR = "base_model"
ADAPTER_FILE = "adapter_model.safetensors"
_BACKBONE_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json"]


class CheckpointMixin(ModelHubMixin):
    """Save / load / push in tokenq's layout (see the module docstring)."""

    # ---- save ------------------------------------------------------------------------------------
    def checkpoint_record(self, state_dict: dict | None = None, with_source: bool = True) -> dict:
        """What `tokenq_config.json` says of this model: head config, backbone mode, source and shapes.
        `state_dict`: the model's gathered state dict, read instead of sharded live parameters.
        `with_source=False` skips the base's source (its fingerprint reads every weight) for shape checks."""
        base = base_model_of(self.backbone)
        mode = "lora" if isinstance(self.backbone, PeftModel) else "frozen" if not self.backbone_trainable else "full"
        base_state = None if state_dict is None else base_state_dict(_backbone_part(state_dict, base_only=True))
        source = pretrained_source(base, base_state) if mode != "full" and with_source else None
        quant = getattr(base.config, "quantization_config", None)
        text = base.config.get_text_config()
        return {
            "format_version": FORMAT_VERSION,
            "heads": self.tokenq_config.to_dict(),
            "backbone": {
                "mode": mode,
                "base_model": source["name_or_path"] if source else None,
                "base_revision": source["revision"] if source else None,
                "base_fingerprint": source["fingerprint"] if source else None,
                "quantization": quant if quant is None or isinstance(quant, dict) else quant.to_dict(),
                "dtype": str(base.dtype).removeprefix("torch."),
                "model_type": base.config.model_type,
                "architectures": base.config.architectures or [type(base).__name__],
                "num_hidden_layers": text.num_hidden_layers,
            },
            "hidden_size": text.hidden_size,
            "vocab_size": self.unembed.shape[0],
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, tokenizer=None, is_main_process: bool = True,
                        state_dict: dict | None = None, model_card_kwargs: dict | None = None,
                        push_to_hub: bool = False, repo_id: str | None = None, **push_to_hub_kwargs) -> str | None:
        """Write backbone (weights, adapter or reference), heads, `tokenq_config.json`, the tokenizer and a
        model card (`model_card_kwargs` go to `tokenq.card.build_model_card`) to `save_directory`;
        with `push_to_hub`, then push them to `repo_id` (default: the folder's name). `state_dict`: this
        model's full state dict gathered from shards (FSDP / ZeRO-3), written instead of the live weights."""
        if not is_main_process:
            return None
        target = Path(save_directory)
        record = self.checkpoint_record(state_dict)
        heads = self.heads.state_dict() if state_dict is None else _part(state_dict, "heads.")
        new = not target.exists()
        with staged_folder(target) if new else tempfile.TemporaryDirectory(dir=target, prefix=TMP_PREFIX) as tmp:
            self._write_backbone(Path(tmp), record["backbone"], state_dict)
            save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, Path(tmp) / HEADS_FILE,
                      metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(record, indent=2))
            self.generate_model_card(record, **(model_card_kwargs or {})).save(Path(tmp) / "README.md")
            if not new:
                _move_into_place(Path(tmp), target)
        if push_to_hub:
            return self.push_to_hub(repo_id or target.name, tokenizer=tokenizer, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _write_backbone(self, folder: Path, record: dict, state_dict: dict | None) -> None:
        backbone = None if state_dict is None else _backbone_part(state_dict)
        if record["mode"] == "lora":
            self.backbone.save_pretrained(folder, state_dict=backbone)
            if record["base_model"] is None:
                base = base_model_of(self.backbone)
                source = base if state_dict is None else _backbone_part(state_dict, base_only=True)
                base.save_pretrained(folder / BASE_DIR, state_dict=base_state_dict(source))
        elif record["base_model"] is None:  # full, or frozen without a source to point at
            self.backbone.save_pretrained(folder, state_dict=backbone)

    def generate_model_card(self, record: dict | None = None, **kwargs) -> ModelCard:
        """The model card (`README.md`) written with every save; see `tokenq.card.build_model_card`. `record`:
        the checkpoint's `tokenq_config.json` content, when known (else derived from this model)."""
        info = self._hub_mixin_info
        return build_model_card(record or self.checkpoint_record(), info.model_card_data, docs_url=info.docs_url,
                                repo_url=info.repo_url, **kwargs)

    def push_to_hub(self, repo_id: str, *, tokenizer=None, commit_message: str = "Upload tokenq model",
                    private: bool | None = None, token: str | None = None, branch: str | None = None,
                    create_pr: bool | None = None, model_card_kwargs: dict | None = None):
        """Save into a temporary folder and upload it as one commit (creating the repo if needed), as
        `ModelHubMixin.push_to_hub` does, with the tokenizer in the same commit. Returns the `CommitInfo`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
            self.save_pretrained(tmp, tokenizer=tokenizer, model_card_kwargs=card_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                     revision=branch, create_pr=create_pr)

    # ---- load ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, revision: str | None = None, **model_kwargs):
        """Load a folder or Hub repo written by `save_pretrained` (no `trust_remote_code`). From the Hub, only
        the files the load needs are downloaded. `model_kwargs`: `is_trainable` (LoRA adapters trainable),
        `device_map`, `dtype`. Heads load strictly, and every shape is checked against the backbone."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token,
                                    **model_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         is_trainable: bool = False, device_map=None, dtype=None):
        hub = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download,
               "local_files_only": local_files_only, "token": token}
        folder = _resolve(model_id, hub)
        meta = read_config(folder)
        record = meta["backbone"]
        check_files(folder, record)
        head_config = TokenQConfig(**meta["heads"])
        head_config.freeze_backbone = record["mode"] == "frozen"
        backbone = _load_backbone(folder, record, is_trainable, device_map, dtype)
        check_backbone_fits(folder / CONFIG_FILE, meta, backbone)
        _check_saved_weights_finite(folder, record, backbone)
        heads = IQLHeads.from_config(head_config, meta["hidden_size"], meta["vocab_size"])
        head_weights = read_tensors(folder / HEADS_FILE)
        check_finite(head_weights, folder / HEADS_FILE)
        load_strict(heads, head_weights, folder / HEADS_FILE)
        return cls(backbone, head_config, heads=heads.to(backbone.get_output_embeddings().weight.device))

    def load_checkpoint_weights(self, folder: str | os.PathLike) -> None:
        """Restore, in place, the weights of a checkpoint written by `save_pretrained` into this already built
        model (resuming training: the optimizer state refers to these very parameters). Raises before
        touching a weight if the checkpoint does not fit: other heads, backbone mode, architecture or shapes."""
        folder = Path(folder)
        meta = read_config(folder)
        check_files(folder, meta["backbone"])
        mine = self.checkpoint_record(with_source=False)  # only shapes and modes are compared
        check_fits(folder / CONFIG_FILE, meta, mine)
        record = meta["backbone"]
        backbone = {}  # frozen by reference: nothing to restore
        if record["mode"] == "lora":
            adapter = read_tensors(folder / ADAPTER_FILE)
            check_shapes(adapter, get_peft_model_state_dict(self.backbone), folder / ADAPTER_FILE, strict_missing=True)
            name = f".{self.backbone.active_adapter}."  # peft's saved keys drop the adapter name
            live = {k.replace(name, "."): k for k in self.backbone.state_dict() if name in k}
            backbone = {live.get(k, k): v for k, v in adapter.items()}
            check_finite(adapter, folder / ADAPTER_FILE)
        elif record["base_model"] is None:
            backbone, files = _read_backbone_weights(folder)
            check_shapes(backbone, self.backbone.state_dict(), files, strict_missing=False)
            check_finite(backbone, files)
        heads = read_tensors(folder / HEADS_FILE)
        check_shapes(heads, self.heads.state_dict(), folder / HEADS_FILE, strict_missing=True)
        check_finite(heads, folder / HEADS_FILE)
        state = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"heads.{k}": v for k, v in heads.items()}}
        _assign(self, state)


# ---- files ---------------------------------------------------------------------------------------
def _part(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _backbone_part(state_dict: dict, base_only: bool = False) -> dict:
    """The backbone's entries of a `TokenQModel` state dict (`base_only`: under a LoRA wrapper, the base's)."""
    backbone = _part(state_dict, "backbone.")
    if base_only and any(k.startswith("base_model.model.") for k in backbone):
        return _part(backbone, "base_model.model.")
    return backbone


def _move_into_place(tmp: Path, target: Path) -> None:
    """Replace files one by one (SIGINT / SIGTERM held back meanwhile), then drop backbone weights of the other
    kind left by an earlier save."""
    with signals_deferred():
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


def copy_model_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the model files of checkpoint `src` (no optimizer or trainer state) into `dst`, replacing
    those of an earlier save file by file."""
    src, dst = Path(src), Path(dst)
    patterns = files_to_load(read_config(src)["backbone"]) + ["README.md"]
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst, prefix=TMP_PREFIX) as tmp:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if path.is_file() and any(fnmatch(rel, p) for p in patterns):
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(tmp) / rel)
        _move_into_place(Path(tmp), dst)


def files_to_load(record: dict) -> list[str]:
    """Patterns of the files `from_pretrained` reads for a checkpoint with this backbone record."""
    patterns = [CONFIG_FILE, HEADS_FILE]
    if record["mode"] == "lora":
        patterns += ["adapter_config.json", ADAPTER_FILE]
        if record["base_model"] is None:
            patterns += [f"{BASE_DIR}/{p}" for p in _BACKBONE_FILES]
    elif record["base_model"] is None:
        patterns += _BACKBONE_FILES
    return patterns


OPTIONAL_FILES = ("generation_config.json", "model.safetensors.index.json")  # read when present


def check_files(folder: Path, record: dict) -> None:
    """Every file a load of this checkpoint reads is there, and each of its JSON files parses; else an error
    naming the files (transformers' own errors for a missing config.json or a truncated generation_config.json
    are misleading or silent)."""
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    patterns = files_to_load(record)
    missing = [p for p in patterns if not p.endswith(OPTIONAL_FILES) and not any(fnmatch(f, p) for f in present)]
    if missing:
        names = [p.replace("model*.safetensors", "model.safetensors (or its shards)") for p in missing]
        raise FileNotFoundError(f"{folder}: missing {', '.join(names)}: not a whole tokenq checkpoint")
    for rel in present:
        if rel.endswith(".json") and any(fnmatch(rel, p) for p in patterns):
            read_json(folder / rel)


def _resolve(model_id: str, hub: dict) -> Path:
    """A local folder as is; a Hub repo id: its `tokenq_config.json`, then only the files the load needs."""
    if Path(model_id).is_dir():
        return Path(model_id)
    missing = f"no tokenq checkpoint at {model_id}: not a folder, and not a Hub repo id"
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # a Hub id is owner/name
        raise FileNotFoundError(missing)
    try:
        config_file = hf_hub_download(model_id, CONFIG_FILE, **hub)
    except HFValidationError as e:
        raise FileNotFoundError(missing) from e
    except LocalEntryNotFoundError as e:  # offline, or the network is down, and nothing in the cache
        raise FileNotFoundError(f"no tokenq checkpoint at {model_id}: not a folder, and the Hub could not be "
                                "reached for it (offline, and not in the cache)") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"no tokenq checkpoint at {model_id}: no such Hub repo (or no access)") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {model_id} has no {CONFIG_FILE}: not a tokenq checkpoint") from e
    record = _parse_config(Path(config_file))["backbone"]
    return Path(snapshot_download(model_id, allow_patterns=files_to_load(record), **hub))


def read_config(folder: Path) -> dict:
    """The checkpoint's `tokenq_config.json`, checked and in the current format (`check_config`)."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a tokenq checkpoint")
    return _parse_config(file)


def _parse_config(file: Path) -> dict:
    return check_config(read_json(file), file)




def _read_backbone_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_tensors(folder / shard))
        return state, index
    return read_tensors(folder / "model.safetensors"), folder / "model.safetensors"


# ---- backbone and guards -------------------------------------------------------------------------
def _load_backbone(folder: Path, record: dict, is_trainable: bool, device_map, dtype):
    """The saved backbone: weights in the folder, or the referenced base (checked against its fingerprint)."""
    kwargs = {"dtype": dtype or record.get("dtype") or "auto", "device_map": device_map}
    if record.get("quantization") is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(record["quantization"])
        kwargs["device_map"] = device_map or {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    if record["base_model"] is not None:
        base = AutoModelForCausalLM.from_pretrained(record["base_model"], revision=record.get("base_revision"), **kwargs)
        fingerprint = weights_fingerprint(base)  # one read of the weights: checked, then remembered
        check_fingerprint(folder / CONFIG_FILE, record, fingerprint)
        mark_pretrained_source(base, record["base_model"], record.get("base_revision"), fingerprint)
    else:
        base_dir = folder / BASE_DIR if record["mode"] == "lora" else folder
        check_safetensors(base_dir)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    disable_bnb_cpu_inference_repack(base)
    if record["mode"] != "lora":
        return base
    check_safetensors(folder)
    return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)





def _check_saved_weights_finite(folder: Path, record: dict, backbone) -> None:
    """The backbone weights this checkpoint stores (not those of a referenced base: tokenq did not write them)."""
    if record["mode"] == "lora":
        check_finite({k: v for k, v in backbone.named_parameters() if "lora_" in k}, folder / ADAPTER_FILE)
    if record["base_model"] is None:
        check_finite(dict(base_model_of(backbone).named_parameters()),
                     folder / (f"{BASE_DIR}/model.safetensors" if record["mode"] == "lora" else "model.safetensors"))


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `module`'s parameters (keys checked before), also when they are sharded
    DTensors (FSDP2: torch's `set_model_state_dict` scatters each tensor to the shard this process holds)."""
    if any(isinstance(p, DTensor) for p in module.parameters()):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        module.load_state_dict(state, strict=False)



