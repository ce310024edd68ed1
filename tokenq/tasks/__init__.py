"""Built-in tasks: data generator, tokenizer, tiny model config and metric in one object each."""

from tokenq.tasks.arithmetic import Arithmetic
from tokenq.tasks.chartok import build_char_tokenizer
from tokenq.tasks.randomwalks import RandomWalks

TASKS = {"randomwalks": RandomWalks, "arithmetic": Arithmetic}


def get_task(name: str, **kwargs):
    """Build a registered task by name; `kwargs` go to its dataclass (e.g. `graph_seed=1002`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Arithmetic", "RandomWalks", "build_char_tokenizer", "get_task"]
