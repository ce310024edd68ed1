"""`tokenq tune`: find ILQL settings that work on your task, without hand-tuning.

    tokenq tune --model_name_or_path MODEL --dataset_name rows.jsonl --eval_dataset held.jsonl \
        --reward_fn reward.py:score --output_dir DIR [--n_trials 20] [--timeout SECONDS]
    tokenq iql --config DIR/best.yaml --model_name_or_path MODEL --dataset_name rows.jsonl ...   # the winner again

Trials of `tokenq iql` (the config as `tokenq iql` would read it, `--config` or the default for your data, and every
flag given here) with sampled learning rates of model and heads, steps, expectile, backbone (full / LoRA / frozen)
and Q-head rank (`tokenq.tune`), judged by the held-out value diagnostics and stopped early by successive halving;
then the best `--eval_top` trials are decoded on the held-out prompts at every `--eval_betas`, and the best of them
by guided reward wins (by the objective alone without `--reward_fn`). Writes `DIR/best.yaml` (a complete config:
yours plus the winning settings), `DIR/trials.json` (one object per trial: params, objective, state, seconds),
`DIR/metrics.json` (the winner's decoding, value diagnostics and verdict) and the kept models in `DIR/trials/`.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from pathlib import Path

import yaml
from tokenq.evaluation import beta_configs, can_score, sweep
from tokenq.atomic import replace_file
from tokenq.modeling import TokenQModel
from tokenq.outputs import claim_training_output
from tokenq.reporting import write_json
from tokenq.runner import parse, prepare_data, with_config
from tokenq.trainers import IQLConfig, IQLTrainer
from tokenq.tune import (MODEL_KEYS, REDUCTION, Halving, RandomTrial, Rungs, Trials, TuneArguments, objective, rungs, search_space,
                         trial_model)
from tokenq.verdict import behaviour_of, verdict

FAILURES = (RuntimeError, ValueError)  # a trial that diverges or breaks is recorded as failed; the search goes on


def trial_args(run, out: Path):
    """The trials' training arguments: the run's, evaluated only where `Rungs` asks, saving nothing (`Trials` keeps
    the best finished models), no report backends."""
    args = copy.deepcopy(run.train_args)
    args.output_dir, args.eval_strategy, args.save_strategy = str(out / "trials"), "no", "no"
    args.report_to, args.disable_tqdm, args.push_to_hub = [], True, False
    return args


def set_params(args, params: dict) -> None:
    """A trial's settings on its arguments, as `Trainer.hyperparameter_search` sets them (cast to the field's type)."""
    for key, value in params.items():
        old = getattr(args, key)
        setattr(args, key, type(old)(value) if old is not None else value)


def builtin_search(run, data, tune: TuneArguments, args, trials: Trials) -> list[dict]:
    """Random sampling, pruned by `Halving`; one trainer per trial."""
    rng, seen, start, out = random.Random(tune.search_seed), {}, time.time(), []
    space, steps = search_space(run.train_args.max_steps), rungs(run.train_args.max_steps)
    for number in range(tune.n_trials):
        if tune.timeout is not None and time.time() - start > tune.timeout:
            break
        trial = RandomTrial(number, rng)
        trial_settings = copy.deepcopy(args)
        set_params(trial_settings, space(trial))
        halving = Halving(steps, seen)
        trainer = IQLTrainer(trial_model(run, data.scratch_config, trial.params), trial_settings, run.dataset, run.tokenizer,
                             eval_dataset=run.eval_rows, callbacks=[Rungs(steps), halving, trials])
        trials.trainer = trainer
        try:
            trainer.train()
            out.append({"params": trial.params, "state": "pruned" if halving.pruned else "complete"})
        except FAILURES as e:  # recorded, and the search goes on
            out.append({"params": trial.params, "state": "fail", "error": str(e)})
    trials.close()
    return out


def optuna_search(run, data, tune: TuneArguments, args, trials: Trials) -> list[dict]:
    """`Trainer.hyperparameter_search` with Optuna: TPE sampling, `SuccessiveHalvingPruner` at the same rungs."""
    import optuna

    steps, space = rungs(run.train_args.max_steps), search_space(run.train_args.max_steps)

    def model_init(trial):
        # Trainer.train builds the model before it samples the trial's settings (`hp_space`): sample them here first
        # (Optuna answers a repeated suggestion with the same value), so that the model has the trial's backbone and rank.
        return trial_model(run, data.scratch_config, {} if trial is None else (space(trial), trial.params)[1])

    trainer = IQLTrainer(None, args, run.dataset, run.tokenizer, eval_dataset=run.eval_rows, callbacks=[Rungs(steps), trials],
                         model_init=model_init)
    trials.trainer = trainer
    storage = optuna.storages.InMemoryStorage()
    trainer.hyperparameter_search(
        hp_space=space, compute_objective=objective, n_trials=tune.n_trials,
        direction="maximize", backend="optuna", storage=storage, study_name="tokenq-tune", timeout=tune.timeout,
        sampler=optuna.samplers.TPESampler(seed=tune.search_seed), catch=FAILURES,
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=steps[0], reduction_factor=REDUCTION))
    trials.close()
    study = optuna.load_study(study_name="tokenq-tune", storage=storage)
    return [{"params": t.params, "state": t.state.name.lower()} for t in study.trials]


def decode_best(run, trials: Trials, records: list[dict], diagnose) -> list[dict]:
    """The kept trials decoded at every `--eval_betas` on the held-out prompts (when completions can be scored),
    each with its verdict; best first (by guided reward, else by the objective)."""
    task, d, results = run.task, run.data_args, []
    behaviour, per_prompt = behaviour_of(task) if can_score(task) else (None, None)
    for record in records:
        folder = trials.folder / f"trial-{record['number']}"
        if not folder.is_dir():
            continue
        model = TokenQModel.from_pretrained(folder).eval()
        rows = sweep(model, run.tokenizer, task, beta_configs(d.eval_betas), d.eval_samples_per_prompt, run.train_args.seed,
                     **d.filter_kwargs()) if can_score(task) else []
        diagnostics = diagnose(model)
        results.append({"trial": record["number"], "objective": record["objective"],
                        "best_reward": max((r["reward"] for r in rows), default=None),
                        "eval": rows, "value_diagnostics": diagnostics,
                        "verdict": verdict(diagnostics, rows, behaviour, per_prompt), "behavior_reward": behaviour})
    return sorted(results, key=lambda r: -(r["objective"] if r["best_reward"] is None else r["best_reward"]))


def given_settings(argv: list[str], run) -> dict:
    """The settings this command line gives (`--name value`), as parsed, YAML-ready; `--config`, `--output_dir` and
    tune's own flags left out."""
    objects = (run.data_args, run.train_args, run.model_args, run.head_config)
    out = {}
    for flag in argv:
        name = flag[2:] if flag.startswith("--") else None
        owner = next((o for o in objects if name in getattr(o, "__dataclass_fields__", {})), None)
        if owner is not None and name not in ("config", "output_dir"):
            value = getattr(owner, name)
            out[name] = getattr(value, "value", value)  # enums by their value
    return out


def best_config(argv: list[str], run, params: dict, out: Path) -> str:
    """`DIR/best.yaml`: the config `tokenq iql` read (`--config`, or the default for the data), the settings of this
    command line, and the winning ones."""
    resolved = with_config(argv, "iql", "randomwalks")
    config = yaml.safe_load(Path(resolved[resolved.index("--config") + 1]).read_text()) if "--config" in resolved else {}
    config.update(given_settings(argv, run))
    backbone = params["backbone"]
    config.update({k: v for k, v in params.items() if k not in MODEL_KEYS}, q_rank=params["q_rank"],
                  use_peft=backbone == "lora", freeze_backbone=backbone == "frozen", output_dir=str(out / "best"))
    won = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    header = (f"# tokenq iql --config {out / 'best.yaml'}\n#   written by tokenq tune: the config it searched from, its "
              f"command line and the winning settings ({won})\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def trials_table(trials: list[dict]) -> str:
    keys = list(dict.fromkeys(k for t in trials for k in t["params"]))
    lines = ["| trial | " + " | ".join(keys) + " | objective | state | steps | seconds |", "|---:|" + "---|" * (len(keys) + 4)]
    for t in trials:
        cells = [f"{t['params'][k]:.3g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "")) for k in keys]
        objective_cell = "" if t["objective"] is None else f"{t['objective']:.3f}"
        lines.append(f"| {t['number']} | " + " | ".join(cells) + f" | {objective_cell} | {t['state']} | {t['steps']} | {t['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.time()
    run = parse(IQLConfig, "iql", "randomwalks", argv, extra=(TuneArguments,))
    run.command, tune = "tune", run.extra[0]
    backend = tune.backend
    if backend == "auto":
        try:
            import optuna  # noqa: F401
            backend = "optuna"
        except ImportError:
            backend = "builtin"
    if run.train_args.world_size > 1:
        raise ValueError("tokenq tune runs its trials on one process (each is small; run several searches side by side "
                         "instead); launch it without accelerate's multi-process settings")
    if run.data_args.bc_steps:
        raise ValueError(f"--bc_steps {run.data_args.bc_steps}: tokenq tune starts every trial from --model_name_or_path "
                         "and clones no behaviour: fine-tune your model on the rows once first (e.g. trl's SFTTrainer) and "
                         "tune from that model with --bc_steps 0")
    data = prepare_data(run)
    if run.eval_rows is None:
        raise ValueError("tokenq tune judges trials by the value diagnostics on held-out rows: give --eval_dataset FILE or "
                         "--eval_split FRACTION")
    out = claim_training_output(run.train_args, "tune")
    trials = Trials(out / "trials", tune.eval_top)
    args = trial_args(run, out)
    print(f"tokenq tune: {tune.n_trials} trials ({backend}), rungs at steps {rungs(run.train_args.max_steps)}")
    found = (optuna_search if backend == "optuna" else builtin_search)(run, data, tune, args, trials)
    records = [{**r, **f} for r, f in zip(trials.records, found)]
    write_json(out / "trials.json", records)
    finished = sorted((r for r in records if r["state"] == "complete"), key=lambda r: -r["objective"])
    if not finished:
        raise SystemExit(f"tokenq tune: no trial finished (see {out / 'trials.json'})")
    last = trials.trainer
    results = decode_best(run, trials, finished[: tune.eval_top], lambda m: last.value_diagnostics(run.eval_rows, model=m))
    winner = next(r for r in records if r["number"] == results[0]["trial"])
    config = best_config(argv, run, winner["params"], out)
    replace_file(out / "best.yaml", lambda tmp: tmp.write_text(config))  # whole or absent, as every file tokenq writes
    metrics = {"winner": winner, **results[0], "evaluated": [{k: r[k] for k in ("trial", "best_reward")} for r in results],
               "backend": backend, "trials": len(records), "wall_time_s": time.time() - start}
    write_json(out / "metrics.json", metrics)
    print(f"verdict of the winner (trial {winner['number']}): {results[0]['verdict']['message']}")
    print(trials_table(records))
    print(f"wrote {out}/best.yaml, trials.json, metrics.json; wall time {metrics['wall_time_s']:.0f}s")
    return metrics


if __name__ == "__main__":
    main()
