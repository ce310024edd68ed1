"""The skeleton the training recipes share: parse (TrlParser, a default YAML), data, model, optional
behaviour cloning, train (resuming if asked), and finish (model card with the results, Hub push).
Each recipe adds only its objective and its evaluation."""

from __future__ import annotations

import importlib.resources
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import IntervalStrategy
from trl import ModelConfig, TrlParser

from tokenq.data import DataArguments, load_training_data
from tokenq.modeling import TokenQConfig, TokenQModel, build_model
from tokenq.reporting import write_json
from tokenq.sft import behaviour_cloning


@dataclass
class Run:
    data_args: DataArguments
    train_args: object
    model_args: ModelConfig
    head_config: TokenQConfig
    dataset: object = None
    tokenizer: object = None
    model: TokenQModel | None = None
    task: object = None


def builtin_configs() -> Path:
    """The folder of the configs shipped with the package (in git: `configs/`)."""
    return Path(str(importlib.resources.files("tokenq.configs")))


def builtin_config(name: str) -> Path:
    """A shipped config by file name."""
    return builtin_configs() / name


def resolve_config(value: str, prefix: str) -> str:
    """`--config` as given: a YAML file, or a built-in config by name (`randomwalks` is `{prefix}_randomwalks.yaml`;
    `configs/iql_randomwalks.yaml` also resolves from any folder after `pip install tokenq`)."""
    if Path(value).is_file():
        return value
    for name in (f"{prefix}_{value}.yaml", f"{value}.yaml", Path(value).name):
        if builtin_config(name).is_file():
            return str(builtin_config(name))
    shipped = sorted(p.stem.removeprefix(f"{prefix}_") for p in builtin_configs().glob(f"{prefix}_*.yaml"))
    raise FileNotFoundError(f"--config {value}: no such file, and no built-in config of that name (built-in: {shipped})")


def with_config(argv: list[str] | None, prefix: str, default: str) -> list[str]:
    """The command line with `--config` resolved (`default`, a built-in name, when none is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        return ["--config", resolve_config(default, prefix), *argv]
    i = argv.index("--config") + 1
    if i < len(argv):
        argv[i] = resolve_config(argv[i], prefix)
    return argv


def parse(config_cls, prefix: str, default: str, argv: list[str] | None = None) -> Run:
    """Command line (and `--config`, or the built-in `default` without one) into the four dataclasses."""
    # allow_abbrev=False: argparse would take `--learning_rat 0.1` for `--learning_rate` without a word.
    parser = TrlParser((DataArguments, config_cls, ModelConfig, TokenQConfig), allow_abbrev=False)
    return Run(*parser.parse_args_and_config(with_config(argv, prefix, default)))


def use_the_cores() -> None:
    """`accelerate launch` runs a single CPU process with OMP_NUM_THREADS=1, so torch uses one thread: give it
    the machine's cores, as a plain `python` run has (the default run: 110 s instead of 142 s on 2 cores)."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ and os.environ.get("OMP_NUM_THREADS") == "1"
    if launched and "WORLD_SIZE" not in os.environ and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0))
        if cores > torch.get_num_threads():
            torch.set_num_threads(cores)
            print(f"one process on CPU: using {cores} threads (accelerate launch set OMP_NUM_THREADS=1)")


def prepare(run: Run) -> Run:
    """Seed, data, tokenizer, model (and behaviour cloning of its LM when `--bc_steps` > 0)."""
    use_the_cores()
    if run.data_args.bc_steps and run.model_args.use_peft:
        raise ValueError("--bc_steps clones the behaviour policy into a full model; with --use_peft start from a "
                         "pretrained (or behaviour-cloned) --model_name_or_path instead")
    set_seed(run.train_args.seed)
    run.dataset, run.tokenizer, scratch_config, run.task = load_training_data(run.data_args, run.model_args)
    if run.task is None and run.train_args.eval_strategy != IntervalStrategy.NO:
        print("no built-in task: nothing to evaluate by decoding during training (eval_strategy set to 'no')")
        run.train_args.eval_strategy = IntervalStrategy.NO
    run.model = build_model(run.model_args, run.head_config, scratch_config, run.train_args.gradient_checkpointing)
    if run.data_args.bc_steps:
        behaviour_cloning(run.model.backbone, run.tokenizer, run.dataset, str(Path(run.train_args.output_dir) / "bc_run"),
                          max_steps=run.data_args.bc_steps, batch_size=run.train_args.per_device_train_batch_size,
                          learning_rate=run.data_args.bc_learning_rate, seed=run.train_args.seed, disable_tqdm=True)
    return run


def train(trainer, run: Run):
    """`trainer.train()`, resuming as asked: `--resume_from_checkpoint PATH`, or `true` for the latest
    `checkpoint-*` in `output_dir` (as every HF trainer reads it; TrlParser hands the flag over as a string)."""
    resume = run.train_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(run.train_args.output_dir)
    return result


def sharded(trainer) -> bool:
    """Whether training shards the weights across processes (FSDP, DeepSpeed ZeRO-3)."""
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)


def evaluation_model(trainer, run: Run) -> TokenQModel:
    """The trained model for evaluation on the main process: the model itself, or, when training sharded it,
    the checkpoint just saved in `output_dir`, reloaded whole (decoding on one process needs full weights)."""
    return TokenQModel.from_pretrained(run.train_args.output_dir) if sharded(trainer) else run.model


def finish(trainer, run: Run, results: dict | None = None) -> None:
    """On every process: the model card in `output_dir` with the recipe's `results` (`{"table", "metrics",
    "plots"}`, main process only), then the final Hub push with `--push_to_hub` (all processes take part
    in the save; only the main one uploads). A failed push raises after every local file is written."""
    dataset = run.data_args.dataset_name or (run.task.name if run.task is not None else None)
    prompt = next(iter(run.task.eval_prompts()), None) if run.task is not None else None
    trainer.create_model_card(dataset_name=dataset, results=results, example_prompt=prompt)
    if run.train_args.push_to_hub:
        trainer.push_to_hub()


def report(trainer, run: Run, metrics: dict, start: float) -> dict:
    """The end of a recipe on the main process: `wall_time_s`, `metrics.json` in `output_dir`, the model card
    with the metrics and the final push (`finish`), the metrics printed."""
    metrics["wall_time_s"] = time.time() - start
    write_json(Path(run.train_args.output_dir) / "metrics.json", metrics)
    finish(trainer, run, {"metrics": metrics})
    print(metrics)
    return metrics
