"""What a recipe trains and evaluates on: a built-in task, or your dataset (Hub id, local folder, json/jsonl/parquet
file) with held-out rows and a reward function."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, PretrainedConfig
from trl import ModelConfig

from tokenq.checkpoint_checks import read_json
from tokenq.choices import check_list
from tokenq.mdp import tokenize_dataset
from tokenq.tasks import DatasetTask, get_task, load_function, load_reward_fn, split_by_prompt

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_SEED = 0  # --eval_split holds out the same prompts in every run and command


@dataclass
class EvalArguments:
    """The task to evaluate on and how to decode there: shared by the training recipes, `tokenq eval` and
    `tokenq sweep`. Every decoding knob is `tokenq.generate`'s argument of the same name with the prefix `eval_`
    (a list where a grid is swept: each listed value is evaluated)."""

    task: str | None = field(
        default=None, metadata={"help": "Built-in task (randomwalks, arithmetic), when --dataset_name is not given."}
    )
    task_seed: int | None = field(default=None, metadata={"help": "The task's data seed (randomwalks: graph_seed)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Your data: Hub dataset id, local dataset folder, or a .json/.jsonl/.parquet/.csv file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out rows (any data format; a file, folder or Hub id): their prompts are the "
                                "evaluation prompts, their rewards the reference, their tokens the value diagnostics."}
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of --eval_dataset when it is a Hub id or folder."})
    eval_split: float | None = field(
        default=None, metadata={"help": "Without --eval_dataset: hold out this share of --dataset_name's distinct prompts "
                                "(the same prompts in every run and command) for evaluation."}
    )
    reward_fn: str | None = field(
        default=None, metadata={"help": "Your task's reward: FILE.py:NAME or package.module:NAME, a function (prompts, "
                                "completions) -> list[float] (trl's reward_funcs work as they are)."}
    )
    answer_fn: str | None = field(
        default=None, metadata={"help": "Your task's final answer of a completion, for votes (tokenq scale, tokenq.generate's "
                                "vote=): FILE.py:NAME or package.module:NAME, a function (completion) -> str."}
    )
    eval_max_prompts: int | None = field(default=None, metadata={"help": "Evaluate on at most this many held-out prompts."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Decoding budget on your data (default: the longest held-out completion, in tokens)."}
    )
    eval_betas: list[float] = field(
        default_factory=lambda: [0.0, 1.0, 4.0, 16.0, 100.0], metadata={"help": "Guidance strengths to evaluate."}
    )
    eval_etas: list[float] = field(
        default_factory=list, metadata={"help": "Guided sampling at each eta: a distributional critic (value_loss bce) read "
                                        "as Q♯'s Q_eta, beta = 1/eta (tokenq eval: instead of --eval_betas)."}
    )
    eval_samples_per_prompt: int = field(default=10, metadata={"help": "Decodes per evaluation prompt and configuration."})
    eval_top_k: int | None = field(default=10, metadata={"help": "pi_beta's top-k filter, every strategy (0: none)."})
    eval_top_p: float | None = field(default=None, metadata={"help": "pi_beta's top-p filter, every strategy."})
    eval_temperature: float = field(default=1.0, metadata={"help": "pi_beta's temperature, every strategy."})
    eval_num_beams: list[int] = field(default_factory=lambda: [4], metadata={"help": "Beam widths (guided beam search)."})
    eval_num_candidates: list[int] = field(
        default_factory=lambda: [4], metadata={"help": "N candidates of best-of-N and resampling."}
    )
    eval_num_continuations: list[int] = field(
        default_factory=lambda: [4], metadata={"help": "K continuations per step of step search."}
    )
    eval_step_tokens: int | None = field(default=None, metadata={"help": "Step search: a step is this many tokens."})
    eval_step_stop_strings: list[str] | None = field(
        default=None, metadata={"help": "Step search: a step ends with one of these (default: the task's, else one token)."}
    )
    eval_resample_temperature: float = field(default=1.0, metadata={"help": "Temperature of resampling's softmax."})

    def __post_init__(self) -> None:
        """Every decoding knob checked when the command line is parsed, before anything is loaded or trained."""
        from tokenq.distributional import check_eta
        from tokenq.generation import check_decoding_args  # (tokenq.generation imports the model stack)

        grids = ("betas", "num_beams", "num_candidates", "num_continuations")
        for flag in (*grids, "top_k", "top_p", "temperature", "step_tokens", "resample_temperature", "max_new_tokens"):
            name = "beta" if flag == "betas" else flag  # `tokenq.generate`'s argument
            values = getattr(self, f"eval_{flag}")
            for value in values if flag in grids else [values]:
                try:
                    if value is not None:  # None: the default (no filter, the task's budget, ...)
                        check_decoding_args(**{name: value})
                except ValueError as e:
                    raise ValueError(f"--eval_{flag}: {str(e).replace(name, flag, 1)}") from None
        for flag in grids:
            check_list(f"--eval_{flag}", getattr(self, f"eval_{flag}"))
        if self.eval_etas:
            check_list("--eval_etas", self.eval_etas)
        for eta in self.eval_etas:
            try:
                check_eta(eta)
            except ValueError as e:
                raise ValueError(f"--eval_etas: {e}") from None
        for flag in ("samples_per_prompt", "max_prompts"):
            value = getattr(self, f"eval_{flag}")
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--eval_{flag} must be an integer >= 1, got {value!r}")

    def filter_kwargs(self) -> dict:
        """pi_beta's filter as `tokenq.generate` keyword arguments."""
        return {"top_k": self.eval_top_k or None, "top_p": self.eval_top_p, "temperature": self.eval_temperature}


@dataclass
class DataArguments(EvalArguments):
    """Data and evaluation arguments of the training recipes."""

    drop_step_rewards: bool = field(
        default=False, metadata={"help": "Train on the outcome reward only: process-format step rewards become 0."}
    )
    n_layer: int = field(default=6, metadata={"help": "Layers of the tiny model a built-in task trains from scratch."})
    n_embd: int = field(default=144, metadata={"help": "Width of that tiny model."})
    n_head: int = field(default=4, metadata={"help": "Attention heads of that tiny model."})
    bc_steps: int = field(
        default=0, metadata={"help": "First clone the data's policy into the LM (trl SFTTrainer) for this many steps: "
                             "the pi_beta / pi_ref of value search and DQO when a task trains from scratch."}
    )
    bc_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of that behaviour cloning."})
    eval_curve_samples: int = field(
        default=10, metadata={"help": "Guided samples per prompt of the evaluation during training, at the largest "
                              "beta (run with --eval_strategy steps --eval_steps N; logged as eval_reward)."}
    )


def load_tokenizer(name_or_path: str, revision: str = "main"):
    """`AutoTokenizer` with a pad token (EOS if the tokenizer has none) for batched training and decoding. A local
    folder without tokenizer files, or with unreadable ones, raises naming the folder and the files it looked for."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save it beside the "
                                "weights (save_pretrained(dir, tokenizer=...)) or copy the base model's tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception on a bad tokenizer.json)
        if not folder.is_dir():
            raise not_found(name_or_path, e) from None
        raise ValueError(f"{folder}: the tokenizer cannot be loaded: {_tokenizer_problem(folder)} "
                         f"({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class NotFound(FileNotFoundError):
    """A model name that is neither a local folder nor loadable from the Hub; the `tokenq` command prints it as one
    line (no traceback)."""


def not_found(name: str, error: Exception) -> NotFound:
    """The one-line error for a model name that is no local folder and could not be had from the Hub."""
    from huggingface_hub import constants

    where = ("the Hub is not reachable: offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
             else f"not found on the Hugging Face Hub, or the Hub is not reachable ({type(error).__name__})")
    return NotFound(f"{name}: no such local folder, and {where}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer_problem(folder: Path) -> str:
    """Which of a folder's tokenizer files is unreadable or missing."""
    for file in sorted(folder.glob("*.json")):
        if file.name in _TOKENIZER_FILES or file.name in ("special_tokens_map.json", "added_tokens.json"):
            try:
                read_json(file)
            except ValueError as e:
                return str(e)
    if not (folder / "tokenizer.json").is_file():
        return "tokenizer.json is missing (and no slow tokenizer's vocabulary files load)"
    return "its tokenizer files are present and parse, but do not load"


def path_like(name: str) -> bool:
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


def load_rows(name: str, config: str | None = None, split: str = "train", what: str = "--dataset_name") -> Dataset:
    """The raw dataset `name` (one split): a file, a folder, or a Hub id; `what` names the argument in errors."""
    path = Path(name).expanduser()
    if not path.exists() and path_like(name):
        raise FileNotFoundError(f"{what} {name}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"{what} {name}: unsupported file type (use {sorted(_FILE_BUILDERS)})")
        if _blank(path):
            raise ValueError(f"dataset {name} has no rows (the file is empty)")
        try:
            rows = load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 (datasets wraps pyarrow's parse errors without a line number)
            where = malformed_line(path)
            if where is None:
                raise ValueError(f"{what} {path}: cannot be read as {_FILE_BUILDERS[suffix]} ({e}: {e.__cause__})") from e
            raise ValueError(f"{what} {path}: {where}") from e
    else:
        rows = load_dataset(name, config, split=split)
    if len(rows) == 0:
        raise ValueError(f"dataset {name} has no rows")
    return rows


def malformed_line(path: Path) -> str | None:
    """Where a json / jsonl / csv file stops being well-formed, as "line N: what is wrong" (None: nowhere found)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        return _malformed_csv_line(text)
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None  # one JSON document (datasets failed on its shape, not its syntax)
        except json.JSONDecodeError as e:
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not _parses(first):  # not JSON lines either: the document's own error position
                return f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
    for number, line in enumerate(text.splitlines(), start=1):  # JSON lines
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}, column {e.colno}: not valid JSON ({e.msg}): {line[:80]!r}"
        if not isinstance(value, dict):
            return f"line {number}: a JSON object (one row) per line expected, got {type(value).__name__}"
    return None


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _malformed_csv_line(text: str) -> str | None:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        for row in reader:
            if row and len(row) != len(header):
                return f"line {reader.line_num}: {len(row)} fields, the header has {len(header)} ({', '.join(header)})"
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    return None


def checked_rows(rows: Dataset, tokenizer, max_length: int, what: str) -> Dataset:
    """`rows` as they are, once every one of them tokenized as training will read it: a malformed row raises here,
    named by its index in the file (`what`), before the rows are split or any model is built."""
    try:
        tokenize_dataset(rows, tokenizer, max_length=max_length, warn_cut=False)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return rows


def load_task(args: EvalArguments, tokenizer, rows: Dataset | None = None,
              max_length: int = 1 << 30) -> tuple[object | None, Dataset | None]:
    """(task, training rows left after `--eval_split`): a built-in `--task`, or a `DatasetTask` on your held-out
    rows (`--eval_dataset`, or `--eval_split` of `rows` / `--dataset_name`) with `--reward_fn`; None without
    either. Your rows are checked first (`checked_rows`; `rows` as given are taken as checked), and the reward
    function is called once on a few held-out rows, so that a broken one fails before any training step."""
    if rows is None and not (args.dataset_name or args.eval_dataset):
        for flag, own in (("reward_fn", "reward"), ("answer_fn", "answer")):
            if getattr(args, flag):
                raise ValueError(f"--{flag} is for your own data (--dataset_name / --eval_dataset); the built-in task "
                                 f"{args.task!r} has its own {own}")
        return (get_task(args.task, seed=args.task_seed) if args.task else None), rows
    if args.task:
        raise ValueError(f"--task {args.task} and your own data (--dataset_name / --eval_dataset) exclude each other")
    held = None
    if args.eval_dataset:
        held = load_rows(args.eval_dataset, None, args.eval_dataset_split, what="--eval_dataset")
        held = checked_rows(held, tokenizer, max_length, f"--eval_dataset {args.eval_dataset}")
    elif args.eval_split:
        if rows is None:
            rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
            rows = checked_rows(rows, tokenizer, max_length, f"--dataset_name {args.dataset_name}")
        n_rows = len(rows)
        rows, held = split_by_prompt(rows, args.eval_split, SPLIT_SEED)
        print(f"--eval_split {args.eval_split}: {len(held)} of {n_rows} rows held out for evaluation (their prompts are "
              "not trained on; --eval_dataset FILE gives your own, --eval_split 0 trains on all)")
    if held is None:
        if args.reward_fn:
            raise ValueError("--reward_fn needs held-out prompts to score: give --eval_dataset FILE or --eval_split FRACTION")
        return None, rows
    source = args.eval_dataset or args.dataset_name
    task = DatasetTask(held, tokenizer, load_reward_fn(args.reward_fn) if args.reward_fn else None,
                       answer_fn=load_function(args.answer_fn, "--answer_fn") if args.answer_fn else None, name=str(Path(source).with_suffix("")) if path_like(source) else source,
                       max_new_tokens=args.eval_max_new_tokens, max_prompts=args.eval_max_prompts)
    task.check()
    return task, rows


@dataclass
class TrainingData:
    dataset: Dataset  # the training rows (raw)
    tokenizer: object
    scratch_config: PretrainedConfig | None  # a model to build from scratch (a built-in task without a model)
    task: object | None  # what evaluation decodes and scores (`tokenq.tasks.protocol`)
    eval_rows: Dataset | None  # held-out rows: the eval loss and the value diagnostics


def load_training_data(args: DataArguments, model_args: ModelConfig, max_length: int = 1024) -> TrainingData:
    """The training rows, tokenizer, task and held-out rows of a recipe.

    With `--dataset_name` the tokenizer comes from `--model_name_or_path`, every row is checked (`checked_rows`,
    with the training's `max_length`: errors name the row of your file) and the task comes from your held-out
    rows (`load_task`); a built-in task brings its data, held-out rows and tokenizer, and its tiny model config
    unless a pretrained model is named.
    """
    if args.dataset_name:
        if not model_args.model_name_or_path:
            raise ValueError("--dataset_name needs --model_name_or_path (the model and its tokenizer)")
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
        rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
        rows = checked_rows(rows, tokenizer, max_length, f"--dataset_name {args.dataset_name}")
        task, rows = load_task(args, tokenizer, rows, max_length)
        eval_rows = task.eval_dataset() if task is not None else None
        rows, eval_rows = outcome_only(rows, args.drop_step_rewards), outcome_only(eval_rows, args.drop_step_rewards)
        return TrainingData(rows, tokenizer, None, task, eval_rows)
    task, _ = load_task(replace(args, task=args.task or "randomwalks"), None)
    dataset, eval_rows = task.dataset(), (task.eval_dataset() if hasattr(task, "eval_dataset") else None)
    dataset, eval_rows = outcome_only(dataset, args.drop_step_rewards), outcome_only(eval_rows, args.drop_step_rewards)
    if model_args.model_name_or_path:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
        return TrainingData(dataset, tokenizer, None, task, eval_rows)
    tokenizer = task.tokenizer()
    config = task.model_config(tokenizer, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    return TrainingData(dataset, tokenizer, config, task, eval_rows)


def outcome_only(dataset: Dataset | None, drop: bool = True) -> Dataset | None:
    """Process-format rows with their step rewards set to 0 (the outcome `reward` stays); unchanged unless `drop`."""
    if not drop or dataset is None or "step_rewards" not in dataset.column_names:
        return dataset
    return dataset.map(lambda r: {"step_rewards": [0.0] * len(r["step_rewards"])})
