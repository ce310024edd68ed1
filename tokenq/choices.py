"""One check for every list a command takes (strategies, budgets, votes, betas, ...): a name it does not know, or
a value given twice, is an error naming the flag, raised when the command line is parsed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def check_list(flag: str, values: Sequence, allowed: Iterable | None = None) -> None:
    """Refuse an empty list, an unknown entry (when `allowed` is given) and a repeated one."""
    if not values:
        raise ValueError(f"{flag}: give at least one value")
    if allowed is not None and (unknown := [v for v in values if v not in set(allowed)]):
        raise ValueError(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    if repeated := sorted({v for v in values if list(values).count(v) > 1}, key=str):
        raise ValueError(f"{flag}: {repeated} given more than once (each value runs once)")
