"""randomwalks reproduces trlx's data: the figures quoted for graph seeds 1000 and 1002."""

import numpy as np
import pytest

from tokenq.tasks import get_task


@pytest.mark.parametrize("seed, optimality, reached", [(1000, 0.352, 0.560), (1002, 0.790, 0.985)])
def test_randomwalks_dataset_statistics(seed, optimality, reached):
    task = get_task("randomwalks", graph_seed=seed)
    data = task.dataset()
    scores = task.score(data["prompt"], data["completion"])
    assert len(data) == 1000
    assert np.mean(data["reward"]) == pytest.approx(optimality, abs=5e-4)
    assert np.mean(scores["reached"]) == pytest.approx(reached, abs=1e-9)


def test_randomwalks_metric():
    task = get_task("randomwalks")
    adj = task.adjacency
    start = next(n for n in range(1, task.n_nodes) if task.shortest[n] == 2)  # one edge from the goal
    letter = chr(ord("a") + start)
    other = next(n for n in range(1, task.n_nodes) if not adj[start, n])
    scores = task.score([letter, letter, letter], ["a", chr(ord("a") + other) + "a", ""])
    assert scores["reward"] == [1.0, 0.0, 0.0] == scores["optimality"]  # optimal; invalid edge; never arrives
    assert scores["length"] == [2.0, 10.0, 10.0] and scores["reached"] == [1.0, 0.0, 0.0]
    assert len(task.eval_prompts()) == 20  # every start node reaches the goal for graph_seed 1000


def test_character_tokenizer_round_trip():
    tok = get_task("randomwalks").tokenizer()
    assert len(tok) == 24 and tok.decode(tok("abu").input_ids) == "abu"


def test_a_graph_where_no_node_reaches_the_goal_is_refused():
    from tokenq.tasks import get_task

    with pytest.raises(ValueError, match="randomwalks graph_seed 21: no node reaches the goal within"):
        get_task("randomwalks", seed=21)


# ---- the task protocol ---------------------------------------------------------------------------------------
def test_built_in_tasks_implement_the_protocol():
    from tokenq.tasks import Task, checked_scores

    walks, arith = get_task("randomwalks"), get_task("arithmetic")
    for task in (walks, arith):
        assert isinstance(task, Task) and task.max_new_tokens > 0 and task.eval_prompts()
        held = task.eval_dataset()
        assert len(held) > 0 and set(held.column_names) >= {"prompt", "reward"}
    assert walks.behavior_reward() == pytest.approx(0.3515, abs=1e-4)
    assert arith.behavior_reward() == pytest.approx(0.4285, abs=1e-4)
    assert not set(arith.eval_dataset()["prompt"]) & set(arith.dataset()["prompt"])  # held-out prompts are new
    scores = checked_scores(arith, ["1+2+3+4="], ["1;3;6;0"])
    assert scores == {"reward": [1.0], "steps_correct": [1.0]} and arith.answer("1;3;6;0") == "0"


def test_checked_scores_names_the_task_and_the_key():
    from tokenq.tasks import checked_scores

    class Bad:
        name = "bad"

        def __init__(self, out):
            self.out = out

        def score(self, prompts, completions):
            return self.out

    with pytest.raises(ValueError, match=r"task 'bad': score\(\) must return a dict with the key 'reward'"):
        checked_scores(Bad([1.0]), ["p"], ["c"])
    with pytest.raises(ValueError, match=r"returned 2 values for 'reward' for 1 completions"):
        checked_scores(Bad({"reward": [1.0, 2.0]}), ["p"], ["c"])
    with pytest.raises(ValueError, match=r"returned nan for 'len' of completion 0"):
        checked_scores(Bad({"reward": [1.0], "len": [float("nan")]}), ["p"], ["c"])


# ---- a user's task from data -------------------------------------------------------------------------------
def _score(prompts, completions):
    return [float(c.endswith("!")) for c in completions]


def test_dataset_task_on_outcome_rows(tokenizer):
    from datasets import Dataset

    from tokenq.tasks import DatasetTask

    rows = Dataset.from_list([{"prompt": "ab", "completion": "cd!", "reward": 1.0}, {"prompt": "ab", "completion": "c", "reward": 0.0},
                              {"prompt": "x", "completion": "yy", "reward": 1.0}])
    task = DatasetTask(rows, tokenizer, _score, name="mine")
    assert task.eval_prompts() == ["ab", "x"] and task.max_new_tokens == 4  # longest completion + EOS
    assert task.behavior_reward() == pytest.approx(0.75)  # the rows' own rewards, each prompt once: (0.5 + 1) / 2
    assert task.score(["ab", "x"], ["!", "?"]) == {"reward": [1.0, 0.0]}
    assert DatasetTask(rows, tokenizer, _score, max_prompts=1).eval_prompts() == ["ab"]
    assert DatasetTask(rows, tokenizer, _score, max_prompts=1).behavior_reward() == pytest.approx(0.5)  # rows of "ab"


def test_dataset_task_scores_rows_without_a_reward_field_with_the_function(tokenizer):
    from datasets import Dataset

    from tokenq.tasks import DatasetTask

    stepwise = Dataset.from_list([{"prompt": "q", "completions": ["a", "b!"], "labels": [True, False]}])
    task = DatasetTask(stepwise, tokenizer, _score)
    assert task.behavior_reward() == 0.0  # "a\nb!\n" does not end with "!"
    assert DatasetTask(stepwise, tokenizer, None).behavior_reward() is None
    process = Dataset.from_list([{"prompt": "q", "steps": ["a", "b!"], "step_rewards": [0.0, 1.0]}])
    assert DatasetTask(process, tokenizer, _score).behavior_reward() == 1.0  # "ab!"


def test_dataset_task_renders_conversational_prompts_and_hands_messages_to_the_function(tokenizer):
    from datasets import Dataset

    from tokenq.tasks import DatasetTask

    seen = {}

    def score(prompts, completions):
        seen.update(prompts=prompts, completions=completions)
        return [1.0] * len(prompts)

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    task = DatasetTask(rows, tokenizer, score)
    assert task.eval_prompts() == ["<|user|>hi<|end|><|assistant|>"] and not task.prompt_add_special_tokens
    task.score(task.eval_prompts(), ["ok"])
    assert seen["prompts"] == [[{"role": "user", "content": "hi"}]]  # as the rows hold them (trl's convention)
    assert seen["completions"] == [[{"role": "assistant", "content": "ok"}]]


def test_split_by_prompt_holds_out_whole_prompts():
    from datasets import Dataset

    from tokenq.tasks import split_by_prompt

    rows = Dataset.from_list([{"prompt": f"p{i % 10}", "completion": "c", "reward": float(i)} for i in range(40)])
    train, held = split_by_prompt(rows, 0.2, seed=0)
    assert len(set(held["prompt"])) == 2 and len(held) == 8 and len(train) == 32
    assert not set(train["prompt"]) & set(held["prompt"])
    again, _ = split_by_prompt(rows, 0.2, seed=0)
    assert again["reward"] == train["reward"]  # the same split every run
    with pytest.raises(ValueError, match="--eval_split must be a fraction in"):
        split_by_prompt(rows, 1.5)
