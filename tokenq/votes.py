"""Choosing among candidates: aggregations of step scores and votes over final answers (pure functions).

Step scores. A step-level search (`step_search`, `dvts`, `astar`, `mcts`) scores a partial solution after each of
its steps. The score of a step is the critic's Q of the step's last token: the return the critic predicts once the
step is written — what a process reward model (PRM) outputs for the prefix that ends with that step (Lightman et
al. 2023; search-and-learn, Beeching et al. 2024). A path's score aggregates its steps' scores (`AGGREGATES`):

- `last`: the score of the latest step (a PRM's reading of the whole prefix);
- `min`: the weakest step (a path is as good as its worst step; Wang et al. 2024's Math-Shepherd);
- `prod`: the product (the chance that every step is right, when the scores are probabilities: a critic of
  0/1 outcomes; other critics' scores are multiplied as they are);
- `mean`: the mean over the steps;
- `advantage`: tokenq's value score, `V(s_0) + sum_t A(s_t, a_t)` over every generated token: the rewards the
  tokens earn plus the value where the path ends (exact heads telescope to it), read where each token is chosen.
  The default: a token's Q in the state where it is chosen reads what the model itself predicts, while a
  step's last-token Q must re-derive the step's correctness from the state after it (arithmetic: the digit
  is judged before `;` is written, the `;` after it).

Votes (self-consistency, Wang et al. 2023; weighted best-of-N, Li et al. 2023 and search-and-learn): candidates
with the same final answer (the task's `answer(completion)`) pool their votes — one each (`majority`) or their
scores (`weighted`) — and the winning answer's best-scoring candidate is returned.
"""

from __future__ import annotations

from collections import defaultdict

import torch

AGGREGATES = ("last", "min", "prod", "mean", "advantage")
VOTES = ("majority", "weighted")


def aggregate_steps(step_scores: torch.Tensor, n_steps: torch.Tensor, how: str, value_score: torch.Tensor) -> torch.Tensor:
    """A path's score from its step scores. step_scores (R, S): row r's first `n_steps[r]` entries are its steps' scores
    (the rest ignored); value_score (R,): `V(s_0) + sum_t A(s_t, a_t)`, what `advantage` returns and what a path
    with no step yet (the prompt) scores under every aggregation. -> (R,)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if how == "advantage":
        return value_score
    counted = torch.arange(step_scores.shape[1], device=step_scores.device).unsqueeze(0) < n_steps.unsqueeze(1)
    has_steps = n_steps > 0
    if how == "last":
        out = step_scores.gather(1, (n_steps - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    elif how == "min":
        out = step_scores.masked_fill(~counted, float("inf")).min(1).values
    elif how == "prod":
        out = step_scores.masked_fill(~counted, 1.0).prod(1)
    else:
        out = step_scores.masked_fill(~counted, 0.0).sum(1) / n_steps.clamp(min=1)
    return torch.where(has_steps, out, value_score)


def vote(answers: list[str], scores: torch.Tensor, how: str) -> int:
    """The index of the candidate a vote returns: answers (n,) the candidates' final answers, scores (n,) their
    scores. `majority`: the answer most candidates give (a tie goes to the larger summed score); `weighted`: the
    answer with the largest summed score. Returns the best-scoring candidate with the winning answer (the first on
    a tie)."""
    if how not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {how!r}")
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers for {len(scores)} scores")
    values = scores.tolist()
    count, total = defaultdict(int), defaultdict(float)
    for answer, score in zip(answers, values):
        count[answer] += 1
        total[answer] += score
    key = (lambda a: (count[a], total[a])) if how == "majority" else (lambda a: total[a])
    winner = max(count, key=key)  # dicts keep first-seen order: ties go to the answer seen first
    return max((i for i, a in enumerate(answers) if a == winner), key=lambda i: (values[i], -i))
