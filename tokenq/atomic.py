"""Files that are whole or absent: every save is written to a temporary name beside its target and renamed into
place (a rename within one file system is atomic), and a failure — an exception, a full disk, SIGINT or SIGTERM —
removes what it had written. SIGTERM (a preempted job, `kill`) is turned into `Interrupted` for the duration of
`interrupts_raise()`, so that the same clean-up runs for it as for Ctrl-C; the renames themselves run with both
signals held back (`signals_deferred`), so a signal lands before or after them, never between two of them.

Temporary names start with `TMP_PREFIX` ("_*" is in Trainer's and `tokenq push`'s upload ignore patterns, and
"checkpoint-*" globs never match them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = "_tokenq-tmp-"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt (so that `except Exception` does not swallow it)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block SIGTERM raises `Interrupted` (SIGINT raises KeyboardInterrupt, as always), so that every
    `finally` and clean-up runs. No effect outside the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT / SIGTERM held back for the block (a few renames), delivered right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def staging_path(target: Path) -> Path:
    """A fresh temporary name beside `target` (ending in `target`'s name, so its suffix still says the format)."""
    return target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}"


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends normally it becomes `target` in one
    rename (an existing `target` is replaced: moved aside, then deleted); on any failure it is deleted and
    `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(target)
    tmp.mkdir()
    try:
        yield tmp
        old = staging_path(target) if target.exists() else None
        with signals_deferred():
            if old is not None:
                os.replace(target, old)
            os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file at a temporary path beside `path`, then it replaces `path` in one rename;
    on failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
