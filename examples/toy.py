"""What a user brings to tokenq, built here for small toy tasks: behaviour rows (jsonl files of
prompt/completion/reward), held-out rows with other prompts, and a small causal LM that was already fine-tuned
to the data's format (a tiny Llama built from a config, with a character tokenizer, cloned on the rows).

    from toy import write_starting_point
    write_starting_point(rows, held_out, chars="()[]", output_dir="outputs/brackets")

writes `output_dir/train.jsonl`, `output_dir/held.jsonl` and `output_dir/model/` (weights + tokenizer): the
`--dataset_name`, `--eval_dataset` and `--model_name_or_path` of `tokenq iql`.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from tokenq import behaviour_cloning
from tokenq.tasks import build_char_tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_llama(tokenizer, max_positions: int, layers: int = 4, width: int = 128) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def write_starting_point(rows: list[dict], held_out: list[dict], chars: str, output_dir: str | Path, *,
                         bc_steps: int = 1000, seed: int = 0) -> Path:
    """The files a user would have: rows, held-out rows and a model fine-tuned on the rows (behaviour cloning
    with trl's SFTTrainer, `bc_steps` steps of 64 rows)."""
    out = Path(output_dir)
    write_jsonl(out / "train.jsonl", rows)
    write_jsonl(out / "held.jsonl", held_out)
    set_seed(seed)
    tokenizer = build_char_tokenizer(sorted(set(chars)))
    longest = max(len(r["prompt"]) + len(r["completion"]) for r in rows + held_out)
    model = tiny_llama(tokenizer, max_positions=2 * longest + 8)
    behaviour_cloning(model, tokenizer, Dataset.from_list(rows), str(out / "bc_run"), max_steps=bc_steps, batch_size=64,
                      learning_rate=3e-3, seed=seed, disable_tqdm=True, logging_steps=max(1, bc_steps // 4))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out
