"""Trainer checkpoints that are whole or absent, and resuming from the latest whole one.

HF `Trainer` writes `checkpoint-N` file by file (model, optimizer, scheduler, RNG states, trainer_state.json), so a
SIGTERM or a full disk mid-save leaves a partial folder that `get_last_checkpoint` returns and the resume then trips
on. `TokenQTrainer._save_checkpoint` has Trainer write the folder under a temporary name (`staged_checkpoint`) and
renames it into place; `latest_complete_checkpoint` skips (and names) any folder that is not whole, whoever wrote it.

The private parts of Trainer touched here, in this one module: `Trainer._get_output_dir` (where a checkpoint is
written: pointed at the staging folder for the duration of the save) and checkpoint rotation (a module function
in transformers >= 5.1, a method before). `tests/test_resume.py` fails loudly when either changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import transformers.trainer_utils as trainer_utils
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tokenq.atomic import TMP_PREFIX, interrupts_raise, signals_deferred
from tokenq.checkpoint import check_files, read_config
from tokenq.checkpoint_checks import read_json

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problems(folder: Path, needs_optimizer: bool = True) -> list[str]:
    """What keeps `folder` from being a whole tokenq training checkpoint (empty: it is whole): its trainer state
    (readable JSON), its `tokenq_config.json`, every model file that config says a load reads, and the optimizer
    state (unless the run saves only the model)."""
    problems = []
    state = folder / TRAINER_STATE
    if not state.is_file():
        problems.append(f"{state} is missing")
    else:
        try:
            read_json(state)
        except ValueError as e:
            problems.append(str(e))
    try:
        check_files(folder, read_config(folder)["backbone"])
    except (FileNotFoundError, ValueError) as e:
        problems.append(str(e))
    present = [p.name for p in folder.iterdir()]
    if needs_optimizer and not any(p.startswith(("optimizer", "global_step")) for p in present):
        problems.append(f"{folder}: no optimizer state (optimizer.pt)")
    return problems


def latest_complete_checkpoint(output_dir: str | Path, needs_optimizer: bool = True) -> tuple[Path | None, dict[Path, list[str]]]:
    """The whole `checkpoint-N` with the largest N in `output_dir` (None if there is none), and the newer ones it
    skipped with what each lacks."""
    found = sorted(((int(m.group(1)), p) for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    skipped = {}
    for _, folder in found:
        problems = checkpoint_problems(folder, needs_optimizer)
        if not problems:
            return folder, skipped
        skipped[folder] = problems
    return None, skipped


@contextlib.contextmanager
def staged_checkpoint(trainer, trial):
    """Trainer writes `run_dir/checkpoint-N` into `run_dir/_tokenq-tmp-checkpoint-N/` instead (every process that
    writes a part: model, optimizer shards, its RNG state); when all are done the main process renames it into
    place. On any failure the staging folder is removed. Yields the final path."""
    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging = run_dir / f"{TMP_PREFIX}{name}"
    main = trainer.args.should_save
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a process killed outright (SIGKILL) in an earlier run
        # made before any process writes: the model save then moves its files into this folder (as a new folder it
        # would be renamed into place, replacing what other processes had written there meanwhile)
        (staging / name).mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        yield run_dir / name
        trainer.accelerator.wait_for_everyone()
        if main:
            with signals_deferred():
                if (run_dir / name).exists():  # saved twice at one step (an evaluation's best model): the newer wins
                    shutil.rmtree(run_dir / name)
                (staging / name).rename(run_dir / name)
            staging.rmdir()
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        del trainer._get_output_dir
    trainer.accelerator.wait_for_everyone()


def rotate(trainer, run_dir: str) -> None:
    """Trainer's checkpoint rotation in `run_dir` (all but the newest `save_total_limit` deleted, the best kept)."""
    if hasattr(trainer_utils, "rotate_checkpoints"):  # transformers >= 5.1
        trainer_utils.rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                                         best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
    else:
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)


class WholeCheckpoints:
    """The checkpoint side of `TokenQTrainer` (a `transformers.Trainer` mixin): whole checkpoints, a resume that
    takes the latest whole one, SIGTERM handled like Ctrl-C, unreadable training state named."""

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's `checkpoint-N`, written whole under a temporary name and renamed into place
        (`tokenq.trainers.resume`); then the Hub push and the rotation of old checkpoints, on the final folder."""
        push, self.args.push_to_hub = self.args.push_to_hub, False
        try:
            with staged_checkpoint(self, trial) as final:
                super()._save_checkpoint(model, trial)
                staged = Path(self._get_output_dir(trial)) / final.name
                if self.state.best_model_checkpoint == str(staged):  # this one is the best: its final name
                    self.state.best_model_checkpoint = str(final)
                    if self.args.should_save:
                        self.state.save_to_json(str(staged / TRAINER_STATE))
        finally:
            self.args.push_to_hub = push
        if push:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate(self, str(final.parent))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's `train`; `resume_from_checkpoint=True` takes the latest *whole* checkpoint in `output_dir`
        (naming any newer one it skips), a path is checked whole first. SIGTERM stops training like Ctrl-C: no
        partial checkpoint is left, and the error says which checkpoint to resume from."""
        resume_from_checkpoint = self._checked_resume(resume_from_checkpoint)
        with interrupts_raise():
            try:
                return super().train(resume_from_checkpoint, *args, **kwargs)
            except KeyboardInterrupt as e:
                latest, _ = latest_complete_checkpoint(self.args.output_dir, not self.args.save_only_model)
                logger.error("training stopped at step %d (%s); no partial checkpoint was left. Latest complete "
                             "checkpoint: %s", self.state.global_step, str(e) or "stopped by SIGINT",
                             f"{latest} (resume with --resume_from_checkpoint true)" if latest else "none")
                raise

    def _checked_resume(self, resume):
        needs_optimizer = not self.args.save_only_model
        if resume is True:
            latest, skipped = latest_complete_checkpoint(self.args.output_dir, needs_optimizer)
            for folder, problems in skipped.items():
                logger.warning("resume: skipping %s, not a whole checkpoint: %s", folder, "; ".join(problems))
            if latest is None:
                raise ValueError(f"--resume_from_checkpoint true: no whole checkpoint-* in {self.args.output_dir}"
                                 + (f" (skipped {', '.join(p.name for p in skipped)})" if skipped else ""))
            if skipped:
                logger.warning("resume: resuming from %s", latest)
            return str(latest)
        if isinstance(resume, (str, os.PathLike)):
            if problems := checkpoint_problems(Path(resume), needs_optimizer):
                raise ValueError(f"--resume_from_checkpoint {resume}: not a whole checkpoint: {'; '.join(problems)}")
        return resume

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with _named_if_unreadable(checkpoint, "its optimizer / scheduler state (optimizer.pt, scheduler.pt)"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        with _named_if_unreadable(checkpoint, "its random-number states (rng_state*.pth)"):
            super()._load_rng_state(checkpoint)


@contextlib.contextmanager
def _named_if_unreadable(checkpoint, what: str):
    """torch.load's errors on a truncated file name no file: say which checkpoint and which state."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{checkpoint}: {what} cannot be read, truncated or corrupt? ({e})") from e
