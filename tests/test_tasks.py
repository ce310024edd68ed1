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
    assert scores["reward"] == [1.0, 0.0, 0.0]  # optimal; invalid edge; never arrives
    assert scores["length"] == [2.0, 10.0, 10.0] and scores["reached"] == [1.0, 0.0, 0.0]
    assert len(task.eval_prompts()) == 20  # every start node reaches the goal for graph_seed 1000


def test_character_tokenizer_round_trip():
    tok = get_task("randomwalks").tokenizer()
    assert len(tok) == 24 and tok.decode(tok("abu").input_ids) == "abu"


def test_a_graph_where_no_node_reaches_the_goal_is_refused():
    from tokenq.tasks import get_task

    with pytest.raises(ValueError, match="randomwalks graph_seed 21: no node reaches the goal within"):
        get_task("randomwalks", seed=21)
