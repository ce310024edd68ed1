"""The skeleton the training recipes share: parse (TrlParser, a default YAML), data, model, optional
behaviour cloning, train (resuming if asked), and finish (model card with the results, Hub push).
Each recipe adds only its objective and its evaluation."""

from __future__ import annotations

import importlib.resources
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import IntervalStrategy
from trl import ModelConfig, TrlParser

from tokenq.atomic import interrupts_raise
from tokenq.data import DataArguments, load_training_data, path_like
from tokenq.diagnostics import flat_diagnostics
from tokenq.evaluation import can_score, sweep
from tokenq.modeling import TokenQConfig, TokenQModel, build_model
from tokenq.outputs import claim_training_output, resume_value
from tokenq.provenance import announce_settings
from tokenq.reporting import KNOBS, results_table, write_json
from tokenq.verdict import behaviour_of, verdict
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
    task: object = None  # what evaluation decodes and scores (`tokenq.tasks.protocol`), or None
    eval_rows: object = None  # held-out rows (the eval loss, the value diagnostics), or None
    extra: tuple = ()  # the command's own dataclasses beyond the four (`parse(..., extra=...)`), parsed
    command: str = ""  # the command's name in messages (`iql`, `value`, ...)


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


def default_config(argv: list[str], prefix: str, default: str | None) -> str | None:
    """The built-in config a command line without `--config` runs: `{prefix}_dataset.yaml` for your own data
    (`--dataset_name`), `{prefix}_TASK.yaml` for `--task TASK` when there is one, else `default` (None: none)."""
    def value_of(flag: str) -> str | None:
        return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None

    for name in ("dataset" if "--dataset_name" in argv else None, value_of("--task")):
        if name and builtin_config(f"{prefix}_{name}.yaml").is_file():
            return name
    return default


def with_config(argv: list[str] | None, prefix: str, default: str | None) -> list[str]:
    """The command line with `--config` resolved (`default_config` when none is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        name = default_config(argv, prefix, default)
        return argv if name is None else ["--config", resolve_config(name, prefix), *argv]
    i = argv.index("--config") + 1
    if i < len(argv):
        argv[i] = resolve_config(argv[i], prefix)
    return argv


def parse(config_cls, prefix: str, default: str, argv: list[str] | None = None, extra: tuple[type, ...] = ()) -> Run:
    """Command line (and `--config`, or the built-in `default` without one) into the four dataclasses, and the
    command's `extra` ones (`run.extra`)."""
    # allow_abbrev=False: argparse would take `--learning_rat 0.1` for `--learning_rate` without a word.
    parser = TrlParser((DataArguments, config_cls, ModelConfig, TokenQConfig, *extra), allow_abbrev=False)
    user_argv = list(sys.argv[1:] if argv is None else argv)
    resolved = with_config(user_argv, prefix, default)
    parsed = parser.parse_args_and_config(resolved)
    run = Run(*parsed[:4], extra=tuple(parsed[4:]), command=prefix)
    if run.train_args.process_index == 0:  # every value the user did not give, with its source, once
        announce_settings(user_argv, resolved, tuple(parsed), (DataArguments, config_cls, TokenQConfig, *extra),
                          builtin_configs())
    return run


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
    """Seed, data, tokenizer (bad rows are refused first), the output folder claimed
    (`tokenq.outputs.claim_training_output`), then the model (and behaviour cloning of its LM when `--bc_steps` > 0)."""
    data = prepare_data(run)
    claim_training_output(run.train_args, run.command)
    return prepare_model(run, data)


def prepare_data(run: Run):
    """Seed, data, tokenizer, task and held-out rows into `run`; returns the `TrainingData` (for `prepare_model`)."""
    use_the_cores()
    if run.data_args.bc_steps and run.model_args.use_peft:
        raise ValueError("--bc_steps clones the behaviour policy into a full model; with --use_peft start from a "
                         "pretrained (or behaviour-cloned) --model_name_or_path instead")
    set_seed(run.train_args.seed)
    data = load_training_data(run.data_args, run.model_args, run.train_args.max_length)
    run.dataset, run.tokenizer, run.task, run.eval_rows = data.dataset, data.tokenizer, data.task, data.eval_rows
    if not can_score(run.task) and run.eval_rows is None and run.train_args.eval_strategy != IntervalStrategy.NO:
        print("no held-out rows and no reward function: nothing to evaluate during training (eval_strategy set to 'no'); "
              "give --eval_dataset or --eval_split, and --reward_fn")
        run.train_args.eval_strategy = IntervalStrategy.NO
    return data


def prepare_model(run: Run, data) -> Run:
    """The model (`build_model`) and, with `--bc_steps`, behaviour cloning of its LM."""
    run.model = build_model(run.model_args, run.head_config, data.scratch_config, run.train_args.gradient_checkpointing)
    if run.data_args.bc_steps:
        behaviour_cloning(run.model.backbone, run.tokenizer, run.dataset, str(Path(run.train_args.output_dir) / "bc_run"),
                          max_steps=run.data_args.bc_steps, batch_size=run.train_args.per_device_train_batch_size,
                          learning_rate=run.data_args.bc_learning_rate, seed=run.train_args.seed, disable_tqdm=True)
    return run


def train(trainer, run: Run):
    """`trainer.train()`, resuming as asked: `--resume_from_checkpoint PATH`, or `true` for the latest
    `checkpoint-*` in `output_dir` (as every HF trainer reads it; TrlParser hands the flag over as a string)."""
    with interrupts_raise():  # SIGTERM during the final save: the save cleans up after itself
        result = trainer.train(resume_from_checkpoint=resume_value(run.train_args.resume_from_checkpoint))
        trainer.save_model(run.train_args.output_dir)
    return result


def evaluation_model(trainer, run: Run) -> TokenQModel:
    """The trained model for evaluation on the main process: the model itself, or, when training sharded it,
    the checkpoint just saved in `output_dir`, reloaded whole (decoding on one process needs full weights)."""
    return TokenQModel.from_pretrained(run.train_args.output_dir) if trainer.sharded else run.model


def row_name(row: dict) -> str:
    """A sweep row's configuration as a log key: `sample_beta4`, `step_search_num_continuations4`."""
    return "_".join([row["strategy"], *(f"{k}{row[k]:g}" for k in KNOBS if isinstance(row.get(k), (int, float)))])


def evaluate_run(trainer, run: Run, model: TokenQModel, configs: list[dict], plain: dict | None = None) -> dict:
    """The end of a run on the main process, whatever the task: each decoding configuration on the task (when
    completions can be scored) and the value diagnostics on the held-out rows (when there are any), both logged
    with `trainer.log` (so `report_to` gets them), and the verdict on both (`tokenq.verdict`; `plain`: the sweep
    row guided decoding is judged against, when it is not among the configurations). Returns the metrics:
    `verdict`, `task`, `behavior_reward`, `eval` (sweep rows), `best`, `value_diagnostics`."""
    args, task = run.data_args, run.task
    behaviour, per_prompt = behaviour_of(task) if can_score(task) else (None, None)
    metrics = {"verdict": None, "task": getattr(task, "name", None), "behavior_reward": behaviour}
    logs = {}
    if can_score(task) and configs:
        rows = sweep(model, run.tokenizer, task, configs, args.eval_samples_per_prompt, run.train_args.seed,
                     **args.filter_kwargs())
        best = max(rows, key=lambda r: r["reward"])
        metrics.update(eval=rows, best={k: v for k, v in best.items() if k in ("strategy", "reward", *KNOBS)},
                       eval_filter=args.filter_kwargs(), eval_samples_per_prompt=args.eval_samples_per_prompt)
        logs.update({f"eval_reward/{row_name(r)}": r["reward"] for r in rows}, eval_best_reward=best["reward"])
    if run.eval_rows is not None:
        metrics["value_diagnostics"] = trainer.value_diagnostics(model=model)
        logs.update({f"eval_{k}": v for k, v in flat_diagnostics(metrics["value_diagnostics"]).items()})
    if logs:
        trainer.log(logs)
    metrics["verdict"] = verdict(metrics.get("value_diagnostics"), metrics.get("eval"), behaviour, per_prompt, plain)
    return metrics


def finish(trainer, run: Run, results: dict | None = None) -> None:
    """On every process: the model card in `output_dir` with the recipe's `results` (`{"table", "metrics",
    "plots"}`, main process only), then the final Hub push with `--push_to_hub` (all processes take part
    in the save; only the main one uploads). A failed push raises after every local file is written."""
    dataset = run.data_args.dataset_name  # the card's metadata names Hub datasets (or a built-in task), not local files
    if dataset is None and run.task is not None:
        dataset = run.task.name
    elif dataset is not None and path_like(dataset):
        dataset = None
    prompt = next(iter(run.task.eval_prompts()), None) if run.task is not None else None
    trainer.create_model_card(dataset_name=dataset, results=results, example_prompt=prompt)
    if run.train_args.push_to_hub:
        trainer.push_to_hub()


def summary(metrics: dict) -> dict:
    """The scalar results of a run, for the model card: the best decoding, the behaviour reference, how well
    the values predict the held-out returns, the training budget."""
    out = {"behavior_reward": metrics.get("behavior_reward")}
    if found := metrics.get("verdict"):
        out.update(value_learned=found["value_learned"], guidance_helps=found["guidance_helps"])
    if best := metrics.get("best"):
        out.update({"best_reward": best["reward"], "best_decoding": row_name(best)})
    diagnostics = metrics.get("value_diagnostics") or {}
    out.update({k: v for k, v in flat_diagnostics(diagnostics, prefix="held-out ").items() if "mse" in k or "pearson" in k})
    out.update({k: metrics[k] for k in ("train_steps", "wall_time_s") if k in metrics})
    return {k: v for k, v in out.items() if v is not None}


def report(trainer, run: Run, metrics: dict, start: float, plots: tuple[str, ...] = ()) -> dict:
    """The end of a recipe on the main process: `wall_time_s`, `metrics.json` in `output_dir`, the results table
    printed and, with the scalar results and `plots`, in the model card; then the final push (`finish`)."""
    metrics["wall_time_s"] = time.time() - start
    out = Path(run.train_args.output_dir)
    write_json(out / "metrics.json", metrics)
    table = results_table(metrics["eval"], metrics.get("behavior_reward")) if metrics.get("eval") else None
    said = metrics.get("verdict")
    if said:  # first: in the log, then above the table of the card
        print(f"verdict: {said['message']}")
    card_table = "\n\n".join(x for x in (said and f"**Verdict.** {said['message']}", table) if x) or None
    finish(trainer, run, {"table": card_table, "metrics": summary(metrics), "plots": list(plots)})
    if table:
        print(f"task {metrics['task']}:\n{table}")
    if "value_diagnostics" in metrics:
        print("value diagnostics on held-out rows:", json.dumps(metrics["value_diagnostics"]))
    print(f"wrote {out}/metrics.json{''.join(', ' + p for p in plots)}; wall time {metrics['wall_time_s']:.0f}s")
    return metrics
