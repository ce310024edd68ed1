"""Tasks: what evaluation decodes and scores (the protocol in `tokenq.tasks.protocol`).

Built-in tasks bring a data generator, tokenizer, tiny model config and reward in one object each; a user's own
task is `DatasetTask`: held-out rows of any data format and a reward function (`--reward_fn FILE.py:NAME`).
"""

from tokenq.tasks.arithmetic import Arithmetic
from tokenq.tasks.chartok import build_char_tokenizer
from tokenq.tasks.dataset import DatasetTask, split_by_prompt
from tokenq.tasks.protocol import Task, checked_scores
from tokenq.tasks.randomwalks import RandomWalks
from tokenq.tasks.reward import RewardFunction, load_function, load_reward_fn

TASKS = {"randomwalks": RandomWalks, "arithmetic": Arithmetic}


def get_task(name: str, seed: int | None = None, **kwargs):
    """Build a registered task by name; `seed` is its data seed (randomwalks: `graph_seed`), `kwargs` go
    to its dataclass (e.g. `n_walks=500`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    if seed is not None:
        kwargs[TASKS[name].SEED_FIELD] = seed
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Arithmetic", "DatasetTask", "RandomWalks", "RewardFunction", "Task", "build_char_tokenizer",
           "checked_scores", "get_task", "load_function", "load_reward_fn", "split_by_prompt"]
