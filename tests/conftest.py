"""Tiny real components: a character tokenizer with a chat template, tiny GPT-2 / Llama models."""

from __future__ import annotations

import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.tasks import build_char_tokenizer, get_task

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]


@pytest.fixture(scope="session")
def tokenizer():
    chars = list(string.ascii_lowercase + string.digits + " ;+=.,!?")
    return build_char_tokenizer(chars, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE)


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_layer=n_layer, n_embd=n_embd, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(vocab_size: int, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def gpt2(tokenizer):
    return tiny_gpt2(len(tokenizer))


@pytest.fixture
def llama_dir(tmp_path_factory, tokenizer):
    """A tiny Llama and the tokenizer saved as a local folder: what a Hub id resolves to."""
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The Hub's network edge replaced by local folders (see tests/fake_hub.py)."""
    from tests.fake_hub import FakeHub

    return FakeHub(tmp_path / "fake_hub").install(monkeypatch)


def fixed_advantage_model(tokenizer, advantage: torch.Tensor, seed: int = 7) -> TokenQModel:
    """Heads whose A(s, a) = advantage[a] in every state: g = 0, Q = bias = advantage + 0.5, V = 0.5."""
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=seed), TokenQConfig())
    with torch.no_grad():
        for head in [*model.heads.q, *model.heads.target_q]:
            head.g[2].weight.zero_()
            head.g[2].bias.zero_()
            head.bias.copy_(advantage + 0.5)
        model.heads.v.net[2].weight.zero_()
        model.heads.v.net[2].bias.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="session")
def arithmetic_policy(tmp_path_factory):
    """A tiny (untrained) Llama for the arithmetic task, saved as a plain HF folder."""
    task = get_task("arithmetic")
    tokenizer = task.tokenizer()
    folder = tmp_path_factory.mktemp("policy")
    AutoModelForCausalLM.from_config(task.model_config(tokenizer, n_layer=1, n_embd=32, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def arithmetic_critic(arithmetic_policy, tmp_path_factory):
    """A tokenq checkpoint (fresh heads) on the tiny arithmetic Llama: a critic for `tokenq extract`."""
    folder = tmp_path_factory.mktemp("critic")
    model = TokenQModel(AutoModelForCausalLM.from_pretrained(arithmetic_policy), TokenQConfig())
    model.save_pretrained(folder, tokenizer=get_task("arithmetic").tokenizer())
    return str(folder)
