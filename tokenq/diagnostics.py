"""Held-out value diagnostics: the figures a user reads to trust the heads, with or without a reward function.

On held-out rows (tokenized, rewards in the heads' units), with V and Q as decoding reads them
(`V(s)`, `min_i Qbar_i(s, a)`, links applied):

- `td_mse`: mean squared TD error `(Q(s_t, a_t) - (r_t + gamma V(s_next)))^2` over the data's actions;
- `expectile_residual`: `E[|tau - 1(u < 0)| u^2]`, `u = Q(s_t, a_t) - V(s_t)` (IQL's V loss, eq. 5 of Kostrikov
  et al. 2021; tau = 0.5 for objectives without an expectile: half the mean squared advantage);
- `v0`: how well V of the state before the first action predicts the realised return `G_0` of the row;
- `q`: how well Q at the data's actions predicts the return-to-go `G_t`;
each as `mse`, `pearson`, `spearman` and, where the rows' returns take two values (0/1 outcomes), `roc_auc`
(the estimate ranking successful rows, or actions of successful rows, above failed ones), with `spearman_p` /
`roc_auc_p`: the one-sided chance of doing as well with the returns shuffled between rows (`permutation_p`).
"""

from __future__ import annotations

import numpy as np
import torch

from tokenq.mdp import action_positions
from tokenq.returns import discounted_returns, gather_next, next_state


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties given their average rank (as `scipy.stats.rankdata`)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    out = np.empty(len(x))
    out[order] = np.repeat(average, ends - starts)
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; None when either side is constant (undefined)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative) + 0.5 P(tie), by the Mann-Whitney U statistic; None
    without both classes."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


PERMUTATIONS = 999  # p-values down to 0.001


def shuffled_index(row: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """For targets grouped by row (`row`: 0..R-1, each row's entries contiguous and in order), the index each entry
    reads when row i takes row perm[i]'s targets, at the same relative position (rows differ in length). `perm`: (R,)
    or one permutation per line (P, R), giving (N,) or (P, N)."""
    counts = np.bincount(row, minlength=len(perm))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(len(row)) - starts[row]
    source = perm[..., row]
    return starts[source] + (position * counts[source]) // counts[row]


def spearman_of_ranks(ranked: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Spearman correlation of the predictions (their ranks, (N,)) with each row of target codes ((P, N): each
    target's value index 0..K-1 in value order, as `np.unique(..., return_inverse=True)` gives it): the targets'
    tie-averaged ranks come from counts, no sort. (P,); -inf where a row's targets are constant (undefined)."""
    k = int(codes.max()) + 1
    counts = np.bincount((codes + k * np.arange(len(codes))[:, None]).ravel(), minlength=k * len(codes)).reshape(-1, k)
    average = np.cumsum(counts, axis=1) - (counts - 1) / 2.0  # each value's 1-based average rank, per row
    target = np.take_along_axis(average, codes, axis=1)
    target = target - target.mean(axis=1, keepdims=True)
    centred = ranked - ranked.mean()
    scale = np.sqrt((target**2).sum(axis=1) * (centred**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (target @ centred) / scale, -np.inf)


def auc_of_ranks(ranked: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """ROC AUC (code 1 positive) of the predictions (their ranks, (N,)) for each row of 0/1 codes ((P, N)): the
    Mann-Whitney U statistic from rank sums, no sort. (P,); -inf where a row lacks a class."""
    labels = (codes == 1).astype(float)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (labels @ ranked - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, -np.inf)


RANK_STATISTICS = {"spearman": spearman_of_ranks, "roc_auc": auc_of_ranks}
CHUNK_ENTRIES = 2_000_000  # shuffled targets held at once (P x N)


def permutation_p(pred: np.ndarray, target: np.ndarray, row: np.ndarray, statistic: str, n: int = PERMUTATIONS,
                  seed: int = 0) -> float | None:
    """One-sided p-value of a rank `statistic` ("spearman", or "roc_auc" of 0/1 targets) of `pred` against `target`:
    the share of `n` shuffles of the targets between rows (`shuffled_index`; a row's tokens share one outcome, so
    they move together) that do as well, counting the observed one ((1 + hits) / (1 + n)). None when the statistic
    is undefined. Ranks are taken once and the shuffles evaluated in chunks of whole arrays."""
    ranked, codes = ranks(pred), np.unique(target, return_inverse=True)[1].reshape(-1)
    measure = RANK_STATISTICS[statistic]
    observed = measure(ranked, codes[None])[0]
    if not np.isfinite(observed):
        return None
    rng = np.random.default_rng(seed)
    rows = np.unique(row, return_inverse=True)[1].reshape(-1)
    identity = np.arange(rows.max() + 1)
    hits, done = 0, 0
    while done < n:
        size = min(n - done, max(1, CHUNK_ENTRIES // len(rows)))
        perms = rng.permuted(np.broadcast_to(identity, (size, len(identity))), axis=1)
        hits += int(np.sum(measure(ranked, codes[shuffled_index(rows, perms)]) >= observed - 1e-12))
        done += size
    return (1 + hits) / (1 + n)


def prediction_report(pred: np.ndarray, target: np.ndarray, outcome: np.ndarray | None,
                      row: np.ndarray | None = None, permutations: int = PERMUTATIONS) -> dict[str, float | None]:
    """`mse`, `pearson`, `spearman` (with `spearman_p`) of `pred` against `target`, and `roc_auc` (with `roc_auc_p`)
    against the 0/1 `outcome` (None when the returns are not two-valued). `row`: each entry's row, for the
    permutation bound (default: one row each); `permutations=0` leaves the p-values out (None)."""
    row = np.arange(len(pred)) if row is None else row
    report = {"mse": float(np.mean((pred - target) ** 2)), "pearson": pearson(pred, target),
              "spearman": spearman(pred, target),
              "spearman_p": permutation_p(pred, target, row, "spearman", permutations) if permutations else None}
    report["roc_auc"] = None if outcome is None else roc_auc(pred, outcome)
    report["roc_auc_p"] = None if outcome is None or not permutations else permutation_p(pred, outcome, row, "roc_auc",
                                                                                          permutations)
    return report


def binary_outcome(returns: np.ndarray) -> np.ndarray | None:
    """Rows' returns as 0/1 labels (1 = the higher value) when they take exactly two values, else None."""
    values = np.unique(returns)
    return (returns == values[1]).astype(float) if len(values) == 2 else None


def batch_estimates(model, batch: dict[str, torch.Tensor], gamma: float) -> dict[str, torch.Tensor]:
    """Per action (N,): `q`, `v`, `y` (TD target), `g` (return-to-go), `row` (its row); per row (B,): `v0`, `g0`."""
    values, q_t = model.value_estimates(batch["input_ids"], batch["attention_mask"], batch["action_mask"])
    acting = action_positions(batch["action_mask"])
    nxt = next_state(batch["action_mask"], batch["attention_mask"], batch["terminated"])
    returns = discounted_returns(batch["rewards"], batch["action_mask"], gamma)
    y = batch["rewards"] + gamma * nxt.bootstrap * gather_next(values, nxt)
    first = acting.float().argmax(1)  # the state before each row's first action
    rows = torch.arange(len(first), device=first.device)
    return {"q": q_t, "v": values[acting], "y": y[acting], "g": returns[acting],
            "row": rows.unsqueeze(1).expand_as(acting)[acting], "v0": values[rows, first], "g0": returns[rows, first]}


def summarize(parts: list[dict[str, torch.Tensor]], tau: float, with_q: bool = True,
              permutations: int = PERMUTATIONS) -> dict:
    """The diagnostics from `batch_estimates` of every held-out batch; without Q (`with_q=False`: heads the
    objective does not train, e.g. DQO's) only `v0`."""
    offsets = np.cumsum([0] + [len(p["g0"]) for p in parts[:-1]])
    cat = {k: np.concatenate([p[k].double().cpu().numpy() for p in parts]) for k in ("q", "v", "y", "g", "v0", "g0")}
    row = np.concatenate([p["row"].cpu().numpy() + o for p, o in zip(parts, offsets)])
    outcome = binary_outcome(cat["g0"])
    report = {"rows": len(cat["g0"]), "actions": len(cat["q"]), "v0": prediction_report(cat["v0"], cat["g0"], outcome, None, permutations)}
    if with_q:
        u = cat["q"] - cat["v"]
        report.update(td_mse=float(np.mean((cat["q"] - cat["y"]) ** 2)),
                      expectile_residual=float(np.mean(np.abs(tau - (u < 0)) * u**2)),
                      q=prediction_report(cat["q"], cat["g"], None if outcome is None else outcome[row], row, permutations))
    return report


@torch.no_grad()
def value_diagnostics(model, batches, gamma: float, tau: float = 0.5, with_q: bool = True,
                      permutations: int = PERMUTATIONS) -> dict:
    """The diagnostics of a `TokenQModel` on held-out `batches` (`TokenCollator` dicts on the model's device)."""
    was_training = model.training
    model.eval()
    try:
        return summarize([batch_estimates(model, batch, gamma) for batch in batches], tau, with_q, permutations)
    finally:
        model.train(was_training)


def dataset_diagnostics(model, dataset, collator, gamma: float, tau: float = 0.5, with_q: bool = True,
                        batch_size: int = 32, permutations: int = PERMUTATIONS) -> dict:
    """`value_diagnostics` on a tokenized dataset (`tokenq.mdp.tokenize_dataset` columns), batched by `collator`
    (a `TokenCollator`) on the model's device."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    device = model.unembed.device
    return value_diagnostics(model, ({k: v.to(device) for k, v in b.items()} for b in loader), gamma, tau, with_q,
                             permutations)


def flat_diagnostics(diagnostics: dict, prefix: str = "value/") -> dict[str, float]:
    """For `Trainer.log`: `value/td_mse`, `value/v0_pearson`, ... (undefined entries left out)."""
    flat = {}
    for key, value in diagnostics.items():
        if isinstance(value, dict):
            flat.update({f"{prefix}{key}_{k}": v for k, v in value.items() if v is not None})
        elif key not in ("rows", "actions"):
            flat[f"{prefix}{key}"] = value
    return flat
