"""`--reward_fn FILE.py:NAME` / `package.module:NAME`: loading, calling conventions, and every error named."""

import pytest

from tokenq.tasks import load_reward_fn


def _file(tmp_path, body: str, name: str = "reward.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_a_file_and_a_module(tmp_path, monkeypatch):
    fn = load_reward_fn(_file(tmp_path, "def score(prompts, completions):\n    return [len(c) for c in completions]\n") + ":score")
    assert fn(["a", "b"], ["xy", ""]) == {"reward": [2.0, 0.0]}
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "rewards.py").write_text("def ends(p, c):\n    return [float(x.endswith(y)) for x, y in zip(c, p)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("mypkg.rewards:ends")
    assert not fn.by_keyword and fn(["b", "x"], ["ab", "ab"]) == {"reward": [1.0, 0.0]}  # other names: positional


def test_trl_style_reward_function_works_unchanged(tmp_path):
    body = "def accuracy(completions, **kwargs):\n    return [float(c == kwargs['prompts'][i]) for i, c in enumerate(completions)]\n"
    fn = load_reward_fn(_file(tmp_path, body) + ":accuracy")
    assert fn(["a", "b"], ["a", "c"]) == {"reward": [1.0, 0.0]}


def test_a_dict_with_named_extras(tmp_path):
    body = "def score(prompts, completions):\n    return {'reward': [1] * len(completions), 'length': [len(c) for c in completions]}\n"
    assert load_reward_fn(_file(tmp_path, body) + ":score")(["p"], ["abc"]) == {"reward": [1.0], "length": [3.0]}


@pytest.mark.parametrize("body, spec_name, message", [
    (None, "score", r"--reward_fn .*nowhere\.py:score: no such file"),
    ("def other(p, c):\n    return []\n", "score", r"has no 'score' \(callables there: \['other'\]\)"),
    ("import not_a_module_anywhere\n", "score", r"cannot import module"),
    ("raise RuntimeError('boom')\n", "score", r"importing .* raised RuntimeError: boom"),
    ("score = 3\n", "score", r"int object is not callable"),
])
def test_loading_errors_name_the_function(tmp_path, body, spec_name, message):
    path = str(tmp_path / "nowhere.py") if body is None else _file(tmp_path, body)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_reward_fn(f"{path}:{spec_name}")


@pytest.mark.parametrize("spec", ["reward.py", "reward.py:", ":score", "reward.py:not-a-name"])
def test_malformed_specs(spec):
    with pytest.raises(ValueError, match="expected FILE.py:NAME or package.module:NAME"):
        load_reward_fn(spec)


@pytest.mark.parametrize("returns, message", [
    ("[1.0]", r"returned 1 values for 'reward' for 2 completions"),
    ("[1.0, float('nan')]", r"returned nan for 'reward' of completion 1"),
    ("[1.0, float('inf')]", r"returned inf for 'reward' of completion 1"),
    ("[1.0, 'yes']", r"returned 'yes' for 'reward' of completion 1"),
    ("[1.0, None]", r"returned None for 'reward' of completion 1"),
    ("1.0", r"must return a list of 2 numbers"),
    ("{'length': [1, 2]}", r"returned a dict without the key 'reward'"),
    ("1 / 0", r"raised ZeroDivisionError"),
])
def test_bad_values_name_the_function(tmp_path, returns, message):
    spec = _file(tmp_path, f"def score(prompts, completions):\n    return {returns}\n") + ":score"
    with pytest.raises(ValueError, match=rf"reward function .*reward\.py:score {message}"):
        load_reward_fn(spec)(["a", "b"], ["c", "d"])


def test_numpy_and_torch_scalars_and_bools_are_numbers(tmp_path):
    body = "import numpy as np, torch\ndef score(prompts, completions):\n    return [np.float32(0.5), torch.tensor(1.0), True]\n"
    assert load_reward_fn(_file(tmp_path, body) + ":score")(["a", "b", "c"], ["c", "d", "e"]) == {"reward": [0.5, 1.0, 1.0]}
