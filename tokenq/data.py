"""What a recipe trains on: a built-in task or a dataset (Hub id, local folder, json/jsonl/parquet file)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, PretrainedConfig
from trl import ModelConfig

from tokenq.tasks import get_task

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataArguments:
    """Data and evaluation arguments shared by the recipes."""

    task: str | None = field(
        default=None, metadata={"help": "Built-in task (randomwalks). Used when --dataset_name is not given."}
    )
    task_seed: int | None = field(default=None, metadata={"help": "The task's data seed (randomwalks: graph_seed)."})
    drop_step_rewards: bool = field(
        default=False, metadata={"help": "Train on the outcome reward only: process-format step rewards become 0."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, local dataset folder, or a .json/.jsonl/.parquet/.csv file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    n_layer: int = field(default=6, metadata={"help": "Layers of the tiny GPT-2 a task trains from scratch."})
    n_embd: int = field(default=144, metadata={"help": "Width of that tiny GPT-2."})
    n_head: int = field(default=4, metadata={"help": "Attention heads of that tiny GPT-2."})
    eval_betas: list[float] = field(
        default_factory=lambda: [0.0, 1.0, 4.0, 16.0, 100.0], metadata={"help": "Guidance strengths to evaluate."}
    )
    eval_samples_per_prompt: int = field(default=50, metadata={"help": "Guided samples per evaluation prompt."})
    eval_top_k: int | None = field(default=10, metadata={"help": "pi_beta's top-k filter when sampling."})
    eval_top_p: float | None = field(default=None, metadata={"help": "pi_beta's top-p filter when sampling."})
    eval_temperature: float = field(default=1.0, metadata={"help": "pi_beta's temperature when sampling."})
    bc_steps: int = field(
        default=0, metadata={"help": "First clone the data's policy into the LM (trl SFTTrainer) for this many steps: "
                             "the pi_beta / pi_ref of value search and DQO when a task trains from scratch."}
    )
    bc_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of that behaviour cloning."})
    eval_search_k: int = field(default=4, metadata={"help": "K continuations per step when evaluating step search."})
    eval_best_of_n: int = field(default=4, metadata={"help": "N candidates when evaluating best-of-N."})
    eval_curve_samples: int = field(
        default=10, metadata={"help": "Guided samples per prompt of the evaluation during training, at the largest "
                              "beta (run with --eval_strategy steps --eval_steps N; logged as eval_optimality)."}
    )


def load_tokenizer(name_or_path: str, revision: str = "main"):
    """`AutoTokenizer` with a pad token (EOS if the tokenizer has none) for batched training and decoding."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _path_like(name: str) -> bool:
    """A name that can only mean a local file or folder (a Hub id is `owner/name`, no suffix, no `./`)."""
    return (Path(name).suffix.lower() in _FILE_BUILDERS or name.startswith((".", "/", "~"))
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _blank(path: Path) -> bool:
    """Only whitespace (datasets' json reader stops with a bare StopIteration on that), read in chunks."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def load_rows(args: DataArguments) -> Dataset:
    """The raw dataset named by `dataset_name` (one split): a file, a folder, or a Hub id."""
    name = args.dataset_name
    path = Path(name).expanduser()
    if not path.exists() and _path_like(name):
        raise FileNotFoundError(f"--dataset_name {name}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"--dataset_name {name}: unsupported file type (use {sorted(_FILE_BUILDERS)})")
        if _blank(path):
            raise ValueError(f"dataset {name} has no rows (the file is empty)")
        rows = load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train")
    else:
        rows = load_dataset(name, args.dataset_config, split=args.dataset_split)
    if len(rows) == 0:
        raise ValueError(f"dataset {name} has no rows")
    return rows


def load_training_data(args: DataArguments, model_args: ModelConfig) -> tuple[Dataset, object, PretrainedConfig | None, object | None]:
    """(raw dataset, tokenizer, config of a model to build from scratch or None, task or None).

    With `--dataset_name` the tokenizer comes from `--model_name_or_path`; with a built-in task the task
    brings its tokenizer, and its tiny GPT-2 config unless a pretrained model is named.
    """
    if args.dataset_name:
        if not model_args.model_name_or_path:
            raise ValueError("--dataset_name needs --model_name_or_path (the model and its tokenizer)")
        rows = outcome_only(load_rows(args)) if args.drop_step_rewards else load_rows(args)
        return rows, load_tokenizer(model_args.model_name_or_path, model_args.model_revision), None, None
    task = get_task(args.task or "randomwalks", seed=args.task_seed)
    dataset = outcome_only(task.dataset()) if args.drop_step_rewards else task.dataset()
    if model_args.model_name_or_path:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
        return dataset, tokenizer, None, task
    tokenizer = task.tokenizer()
    config = task.model_config(tokenizer, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    return dataset, tokenizer, config, task


def outcome_only(dataset: Dataset) -> Dataset:
    """Process-format rows with their step rewards set to 0 (the outcome `reward` stays)."""
    if "step_rewards" not in dataset.column_names:
        return dataset
    return dataset.map(lambda r: {"step_rewards": [0.0] * len(r["step_rewards"])})
