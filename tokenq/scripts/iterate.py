"""Improvement rounds: train Q, extract a policy, collect with it, retrain Q, extract again (`tokenq iterate`).

    tokenq iterate --config arithmetic_loop            # configs/arithmetic_loop.yaml
    tokenq iterate --config randomwalks_loop
    accelerate launch recipes/iterate.py --config arithmetic_loop --rounds 5 --output_dir outputs/loop5

Every field of `DataArguments` (the task or your data, evaluation), `IQLConfig` (Q's training; `--max_steps` is round
0's), trl's `ModelConfig`, `TokenQConfig`, `LoopArguments` (rounds, exploration) and `ExtractionArguments` (the
method) can be set. Re-running a stopped command resumes at the round it was in (`tokenq.loop`), with the same settings
(each round's `round.json` records them; only `--rounds` may change; `--overwrite true` starts over). A second
process on the same `--output_dir` is refused while the first runs.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from tokenq.evaluation import can_score
from tokenq.loop import Loop, LoopArguments, iterate, start_over
from tokenq.outputs import exclusive
from tokenq.runner import builtin_config, parse, prepare_data, prepare_model
from tokenq.trainers import IQLConfig
from tokenq.trainers.extract import ExtractionArguments


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = argv[argv.index("--task") + 1] if "--task" in argv[:-1] else "arithmetic"
    default = f"{task}_loop" if builtin_config(f"{task}_loop.yaml").is_file() else None  # --task NAME: NAME_loop.yaml
    run = parse(IQLConfig, "iterate", default, argv, extra=(LoopArguments, ExtractionArguments))
    out = Path(run.train_args.output_dir)
    main_process = run.train_args.process_index == 0
    with exclusive(out, "iterate") if main_process else contextlib.nullcontext():  # one run per folder at a time
        if run.train_args.overwrite and main_process:
            start_over(out)
        data = prepare_data(run)
        if not can_score(run.task):
            raise SystemExit("tokenq iterate scores every round's rollouts: use a built-in --task, or your rows with "
                             "held-out prompts (--eval_dataset / --eval_split) and --reward_fn FILE.py:NAME")
        return iterate(Loop(run, *run.extra, out=out), lambda r: prepare_model(r, data))
