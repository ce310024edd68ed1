"""Build the backbone LM from trl's `ModelConfig`: full, frozen, LoRA (peft) or 4-bit QLoRA (bitsandbytes).

A backbone whose weights were loaded from a Hub id or a folder remembers where (`pretrained_source`):
a checkpoint of a frozen or LoRA backbone then stores that reference instead of a copy of the base
weights. A backbone built from a config (even one read with `AutoConfig.from_pretrained(path)`, whose
`name_or_path` still says `path`) has no source and is saved in full.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from trl import ModelConfig, get_peft_config, get_quantization_config

logger = logging.getLogger(__name__)


def disable_bnb_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Keep 4-bit layers differentiable on CPUs with avx512_bf16. bitsandbytes (0.50) repacks 4-bit weights
    into an inference format on the first eval-mode no-grad forward there (right after `from_pretrained`,
    an evaluation pass, generation); backward then goes through `gemv_4bit`, which has no autograd, and
    LoRA adapters below get `grad=None` while the loss still falls a little. Returns the number of
    `Linear4bit` layers patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def base_model_of(backbone) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the backbone itself)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def cache_argument(backbone) -> str:
    """The KV-cache keyword of the backbone's forward: `cache` since transformers 5.24 (where `past_key_values`
    is deprecated, with a warning per call, and announced for removal in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base_model_of(backbone).forward).parameters else "past_key_values"


def _device_map() -> dict[str, int | str]:
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


_SOURCE = "_tokenq_pretrained_source"


def base_state_dict(base: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own weights from under injected LoRA layers (`x.base_layer.weight` -> `x.weight`;
    adapter and modules_to_save copies dropped), from the module or from its (gathered) state dict.
    `save_pretrained` on the wrapped base writes `base_layer` keys that transformers reloads into a
    *re-initialised* model with only a load report."""
    out = {}
    for key, value in (base if isinstance(base, dict) else base.state_dict()).items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


@torch.no_grad()
def weights_fingerprint(base: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """A digest of the base weights (per tensor: name, shape, float64 sum and norm, rounded):
    tells whether a base model is still the one a checkpoint refers to, at the cost of one read of it."""
    digest = hashlib.sha256()
    for key, value in sorted(base_state_dict(base).items()):
        if not isinstance(value, torch.Tensor):
            continue
        total = value.sum(dtype=torch.float64).item()  # no float64 copy of a large tensor
        norm = torch.linalg.vector_norm(value, dtype=torch.float64).item() if value.is_floating_point() else 0.0
        digest.update(f"{key}:{tuple(value.shape)}:{total:.9g}:{norm:.9g};".encode())
    return digest.hexdigest()[:16]


def mark_pretrained_source(model: PreTrainedModel, name_or_path: str, revision: str | None = None,
                           fingerprint: str | None = None) -> None:
    """Record that `model`'s weights are exactly those at `name_or_path` (Hub id or folder) at `revision`
    (`fingerprint`: their `weights_fingerprint`, when the caller has computed it already)."""
    fingerprint = fingerprint or weights_fingerprint(model)
    setattr(model, _SOURCE, {"name_or_path": name_or_path, "revision": revision, "fingerprint": fingerprint})


def pretrained_source(model: PreTrainedModel, state: dict[str, torch.Tensor] | None = None) -> dict | None:
    """`{"name_or_path", "revision", "fingerprint"}` the base weights were loaded from by tokenq, if they
    are still those weights (read from `state`, the base's gathered state dict, when the live parameters
    are sharded); else None (built from a config, loaded by other code, or changed since): a checkpoint
    then keeps a copy of the base weights rather than a reference that would reload others."""
    source = getattr(model, _SOURCE, None)
    if source is None or weights_fingerprint(model if state is None else state) != source["fingerprint"]:
        return None
    return source


def load_backbone(
    model_args: ModelConfig, config: PretrainedConfig | None = None, gradient_checkpointing: bool = False
) -> PreTrainedModel:
    """The causal LM named by `model_args.model_name_or_path` (Hub id or local folder), or a fresh one
    built from `config`. With `use_peft` it is wrapped in LoRA; with `load_in_4bit` it is quantized (nf4)
    and, with `use_peft`, prepared for QLoRA."""
    quantization = get_quantization_config(model_args)
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
            quantization_config=quantization,
            device_map=_device_map() if quantization is not None else None,
        )
        mark_pretrained_source(model, model_args.model_name_or_path, model_args.model_revision)
    elif config is not None:
        if quantization is not None:
            raise ValueError("load_in_4bit/load_in_8bit need a pretrained model (--model_name_or_path)")
        model = AutoModelForCausalLM.from_config(config, dtype=model_args.dtype)
    else:
        raise ValueError("set --model_name_or_path (a Hub id or a local folder) or a built-in --task")
    if quantization is not None:
        disable_bnb_cpu_inference_repack(model)
        if model_args.use_peft:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if model_args.use_peft:
        model = get_peft_model(model, peft_config(model_args))
    return model


def peft_config(model_args: ModelConfig):
    """trl's LoRA config, except that one plain module name stays a name: `ModelConfig` turns a
    one-element `lora_target_modules` into a string (for `all-linear`), which peft reads as a regex
    that must match the *full* module path, so `--lora_target_modules c_attn` would match nothing."""
    config = get_peft_config(model_args)
    target = config.target_modules
    if isinstance(target, str) and target != "all-linear" and target.isidentifier():
        config.target_modules = {target}
    return config
