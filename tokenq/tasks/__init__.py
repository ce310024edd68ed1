"""Built-in tasks: data generator, tokenizer, tiny model config and metric in one object each."""

from tokenq.tasks.arithmetic import Arithmetic
from tokenq.tasks.chartok import build_char_tokenizer
from tokenq.tasks.randomwalks import RandomWalks

TASKS = {"randomwalks": RandomWalks, "arithmetic": Arithmetic}


def get_task(name: str, seed: int | None = None, **kwargs):
    """Build a registered task by name; `seed` is its data seed (randomwalks: `graph_seed`), `kwargs` go
    to its dataclass (e.g. `n_walks=500`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    if seed is not None:
        kwargs[TASKS[name].SEED_FIELD] = seed
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Arithmetic", "RandomWalks", "build_char_tokenizer", "get_task"]
