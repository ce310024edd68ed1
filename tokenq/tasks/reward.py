"""A user's reward function from the command line: `--reward_fn FILE.py:NAME` or `--reward_fn package.module:NAME`.

The function scores completions: `fn(prompts, completions) -> list[float]` (one finite number per completion),
or a dict with a `reward` list and named extras (the task protocol's `score`). It is called with keyword
arguments `prompts=` and `completions=`, as trl's `GRPOTrainer` calls its `reward_funcs`, so a function
written for trl (`def fn(completions, **kwargs)`) works unchanged; a function whose parameters have other
names is called positionally, `(prompts, completions)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from tokenq.tasks.protocol import check_values

CHUNK = 256  # completions per call of a user's reward function
PROGRESS_AFTER_S = 5.0  # a progress bar appears when scoring takes longer than this


class RewardFunction:
    """A loaded reward function, named by its spec in every error; `__call__` returns checked scores."""

    def __init__(self, fn: Callable, spec: str) -> None:
        if not callable(fn):
            raise ValueError(f"reward function {spec}: {type(fn).__name__} object is not callable")
        self.fn, self.spec = fn, spec
        self.by_keyword = _takes_keywords(fn)

    def __call__(self, prompts: list, completions: list) -> dict[str, list[float]]:
        """Checked scores, the function called on batches of at most `CHUNK` completions (as trl calls it on its
        batches); a progress bar appears when scoring takes longer than `PROGRESS_AFTER_S` seconds."""
        parts = []
        with tqdm(total=len(completions), desc=f"reward {self.spec}", unit="completion", delay=PROGRESS_AFTER_S,
                  file=sys.stderr) as progress:
            for start in range(0, len(completions), CHUNK):
                end = start + CHUNK
                parts.append(self._call(prompts[start:end], completions[start:end], start))
                progress.update(len(completions[start:end]))
        if not parts:
            return {"reward": []}
        if any(part.keys() != parts[0].keys() for part in parts):
            raise ValueError(f"reward function {self.spec} returned other keys for different batches: "
                             f"{sorted({k for part in parts for k in part})}")
        return {key: [v for part in parts for v in part[key]] for key in parts[0]}

    def _call(self, prompts: list, completions: list, offset: int) -> dict[str, list[float]]:
        who = f"reward function {self.spec}"
        try:
            out = self.fn(prompts=prompts, completions=completions) if self.by_keyword else self.fn(prompts, completions)
        except Exception as e:
            raise ValueError(f"{who} raised {type(e).__name__}: {e} (called on completions {offset}..{offset + len(completions) - 1})") from e
        if isinstance(out, dict):
            if "reward" not in out:
                raise ValueError(f"{who} returned a dict without the key 'reward' (keys: {sorted(out)})")
            return {key: check_values(values, len(completions), who, key, offset) for key, values in out.items()}
        return {"reward": check_values(out, len(completions), who, offset=offset)}

    def __repr__(self) -> str:
        return f"RewardFunction({self.spec!r})"


def _takes_keywords(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    named = {"prompts", "completions"} <= set(params)
    return named or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_reward_fn(spec: str) -> RewardFunction:
    """`path/to/file.py:name` or `package.module:name` -> `RewardFunction`; a clear error naming `spec` when the
    file or module is missing, fails to import, or has no such callable."""
    return RewardFunction(load_function(spec, "--reward_fn"), spec)


def load_function(spec: str, flag: str):
    """The callable `spec` (`path/to/file.py:name` or `package.module:name`) names; errors name `flag` and `spec`."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{flag} {spec!r}: expected FILE.py:NAME or package.module:NAME")
    where, name = spec.rsplit(":", 1)
    if not where or not name.isidentifier():
        raise ValueError(f"{flag} {spec!r}: expected FILE.py:NAME or package.module:NAME")
    path = Path(where).expanduser()
    if where.endswith(".py") and not path.is_file():
        raise FileNotFoundError(f"{flag} {spec}: no such file {path}")
    try:
        module = _import_file(path) if where.endswith(".py") else importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ValueError(f"{flag} {spec}: cannot import module {where!r} ({e})") from e
    except Exception as e:
        raise ValueError(f"{flag} {spec}: importing {where} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{flag} {spec}: {where} has no {name!r} (callables there: {found})")
    return getattr(module, name)


def _import_file(path: Path):
    module_name = f"tokenq_reward_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        loader.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
