"""Build the backbone LM from trl's `ModelConfig`: full, frozen, LoRA (peft) or 4-bit QLoRA (bitsandbytes)."""

from __future__ import annotations

import logging

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from trl import ModelConfig, get_peft_config, get_quantization_config

from tokenq.modeling import TokenQConfig, TokenQModel

logger = logging.getLogger(__name__)


def disable_bnb_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Keep 4-bit layers differentiable on CPUs with avx512_bf16 (see NOTES.md: an eval-mode forward there
    repacks the weights into an inference format whose matmul has no autograd, and LoRA adapters below it
    silently get no gradient). Returns the number of `Linear4bit` layers patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _device_map() -> dict[str, int | str]:
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def load_tokenizer(name_or_path: str, revision: str = "main"):
    """`AutoTokenizer` with a pad token (EOS if the tokenizer has none) for batched training and decoding."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        model = get_peft_model(model, _peft_config(model_args))
    return model


def _peft_config(model_args: ModelConfig):
    """trl's LoRA config, except that one plain module name stays a name: `ModelConfig` turns a
    one-element `lora_target_modules` into a string (for `all-linear`), which peft reads as a regex
    that must match the *full* module path, so `--lora_target_modules c_attn` would match nothing."""
    config = get_peft_config(model_args)
    target = config.target_modules
    if isinstance(target, str) and target != "all-linear" and target.isidentifier():
        config.target_modules = {target}
    return config


def build_model(
    model_args: ModelConfig,
    head_config: TokenQConfig | None = None,
    config: PretrainedConfig | None = None,
    gradient_checkpointing: bool = False,
) -> TokenQModel:
    """Backbone (see `load_backbone`) + fresh heads. A quantized backbone without LoRA is frozen."""
    head_config = head_config or TokenQConfig()
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and not model_args.use_peft and not head_config.freeze_backbone:
        logger.warning("a quantized backbone cannot be trained without --use_peft: freezing it (heads only)")
        head_config.freeze_backbone = True
    if model_args.use_peft and head_config.freeze_backbone:
        raise ValueError("--use_peft and --freeze_backbone exclude each other: pick LoRA or a frozen backbone")
    backbone = load_backbone(model_args, config, gradient_checkpointing)
    return TokenQModel(backbone, head_config)
