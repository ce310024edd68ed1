"""Step-score aggregations and votes over answers, on fixed numbers."""

import pytest
import torch

from tokenq.votes import aggregate_steps, vote

NAN = float("nan")
STEPS = torch.tensor([[0.9, 0.5, 0.8, NAN], [0.6, 0.7, NAN, NAN], [NAN, NAN, NAN, NAN], [0.2, 0.4, 1.0, 0.5]])
N_STEPS = torch.tensor([3, 2, 0, 2])  # row 3: only its first two steps count
VALUE_SCORE = torch.tensor([1.5, -0.5, 0.25, 0.75])


@pytest.mark.parametrize("how, expected", [
    ("last", [0.8, 0.7, 0.25, 0.4]),
    ("min", [0.5, 0.6, 0.25, 0.2]),
    ("prod", [0.9 * 0.5 * 0.8, 0.6 * 0.7, 0.25, 0.2 * 0.4]),
    ("mean", [(0.9 + 0.5 + 0.8) / 3, 0.65, 0.25, 0.3]),
    ("advantage", [1.5, -0.5, 0.25, 0.75]),
])
def test_each_aggregation_on_fixed_step_scores(how, expected):
    """A row without steps (the prompt) scores its value score under every aggregation; entries past n_steps
    are ignored (row 3)."""
    assert aggregate_steps(STEPS, N_STEPS, how, VALUE_SCORE).tolist() == pytest.approx(expected, abs=1e-6)


def test_an_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate_steps(STEPS, N_STEPS, "max", VALUE_SCORE)


def test_majority_and_weighted_votes_on_fixed_answers():
    answers = ["7", "3", "7", "3", "3", "5"]
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.95])
    # majority: "3" (3 votes) beats "7" (2) and "5" (1); its best-scoring candidate is index 4
    assert vote(answers, scores, "majority") == 4
    # weighted: "7" sums 1.7, "5" 0.95, "3" 0.6; its best candidate is index 0
    assert vote(answers, scores, "weighted") == 0
    # the single best score (best-of-N) would pick "5"
    assert int(scores.argmax()) == 5


def test_vote_ties():
    """A majority tie goes to the larger summed score; a full tie to the answer seen first, and within an answer
    the first of equal scores."""
    assert vote(["a", "b", "a", "b"], torch.tensor([0.1, 0.5, 0.2, 0.1]), "majority") == 1
    assert vote(["a", "b", "b", "a"], torch.tensor([0.5, 0.5, 0.5, 0.5]), "majority") == 0
    assert vote(["a", "b"], torch.tensor([0.5, 0.5]), "weighted") == 0


def test_vote_checks_its_arguments():
    with pytest.raises(ValueError, match="vote must be one of"):
        vote(["a"], torch.tensor([1.0]), "plurality")
    with pytest.raises(ValueError, match="2 answers for 1 scores"):
        vote(["a", "b"], torch.tensor([1.0]), "majority")
