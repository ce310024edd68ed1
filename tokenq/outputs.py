"""What a command may do to what an earlier run left behind: nothing that exists is replaced unless the user passes
`--overwrite true`, and resuming (`--resume_from_checkpoint`, `tokenq iterate`'s rounds) is not overwriting.

Every command that writes outputs (rollouts, models, checkpoints, rounds) claims them here before it loads a model
or trains a step; a refusal exits with an error naming the path and the flag, and leaves every file as it was.
Reports (`*_metrics.json`, plots, cards) are not claimed: they are replaced, atomically (`tokenq.atomic`).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def resume_value(value) -> bool | str | None:
    """`--resume_from_checkpoint` as every HF trainer reads it: `true` (the latest whole `checkpoint-*` in the output
    folder), a path, or nothing (TrlParser hands the flag over as a string)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value or None


def refusal(command: str, path: Path, what: str, resume_hint: str = "") -> SystemExit:
    """The error of a command that will not replace `path`."""
    hint = f"; {resume_hint}" if resume_hint else ""
    return SystemExit(f"tokenq {command}: {path} already {what}: pass --overwrite true to replace it, or choose another "
                      f"output{hint} (nothing was written)")


def claim_file(path: str | Path, overwrite: bool, command: str) -> Path:
    """`path` may be written: it does not exist, or `overwrite` says it may be replaced."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"tokenq {command}: {path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise refusal(command, path, "exists")
    return path


def claim_output_dir(output_dir: str | Path, *, overwrite: bool, resume, command: str, inputs: tuple[str, ...] = (),
                     main_process: bool = True) -> Path:
    """`output_dir` may receive a training run's checkpoints and model: it is absent or empty (names matching the glob
    patterns `inputs` are the command's own reusable inputs and do not count), or the run resumes from a checkpoint
    there, or `overwrite` is set — then the earlier run's `checkpoint-*` folders are removed (by the `main_process`
    alone: every process checks, one removes), so that a later `--resume_from_checkpoint true` finds this run's only."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tokenq {command}: --output_dir {out} is a file, not a folder")
    found = sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in inputs)) if out.is_dir() else []
    if not found or resume_value(resume):
        return out
    if not overwrite:
        checkpoints = [n for n in found if n.startswith("checkpoint-")]
        hint = "or resume its training with --resume_from_checkpoint true" if checkpoints else ""
        shown = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
        raise refusal(command, out, f"holds an earlier run's outputs ({shown})", hint)
    for name in found if main_process else ():
        if name.startswith("checkpoint-"):
            shutil.rmtree(out / name)
            logger.warning("--overwrite true: removed %s", out / name)
    return out


def claim_training_output(args, command: str, inputs: tuple[str, ...] = ()) -> Path:
    """`claim_output_dir` for a trainer's arguments (`output_dir`, `overwrite`, `resume_from_checkpoint`) on every
    process — each checks, the main process alone removes — then a barrier, so that no process writes there before
    every other one has checked."""
    from accelerate import PartialState

    out = claim_output_dir(args.output_dir, overwrite=args.overwrite, resume=args.resume_from_checkpoint, command=command,
                           inputs=inputs, main_process=args.process_index == 0)
    PartialState().wait_for_everyone()
    return out


@contextlib.contextmanager
def exclusive(output_dir: str | Path, command: str) -> Iterator[None]:
    """Hold `output_dir` for the block: a second process that asks for it meanwhile is refused. The lock is taken
    before the folder is created, on a file beside it (`.NAME.lock`), with `flock`: the system releases it when the
    holding process ends, so a crash never leaves it stuck."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"tokenq {command}: another process is running on {out} (it holds {lock}): wait for it to end, "
                         "or choose another --output_dir") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
