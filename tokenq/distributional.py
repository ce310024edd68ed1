"""Q♯'s risk-seeking values from a distributional critic (Zhou et al. 2025, "Q♯: Provably Optimal
Distributional RL for LLM Post-Training").

A critic trained on rollouts of a reference policy pi_ref learns the distribution of the return-to-go Z(s, a)
under pi_ref. For any eta > 0 chosen at decoding time, `Q_eta(s, a) = eta log E[exp(Z(s, a) / eta)]` gives the
optimal policy of the KL-regularised objective `E[r] - eta KL(pi || pi_ref)`:
`pi*(a|s) ∝ pi_ref(a|s) exp(Q_eta(s, a) / eta)` (Q♯, arXiv:2502.20548), i.e. guided sampling with beta = 1 / eta.
Small eta -> max over the returns pi_ref can reach; large eta -> E[Z] (the plain Monte-Carlo Q).

Two parametrisations of the return distribution: a Bernoulli (heads trained with BCE on 0/1 returns; the head
output is the logit of P(Z = 1)), and a categorical over K atoms `z_1 < ... < z_K` evenly spaced on
[return_min, return_max] (heads with `return_bins = K` outputs, trained by cross-entropy on the two-hot
projection of the return, `two_hot`; Q♯'s distributional critic for other returns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bernoulli_q_eta(logit: torch.Tensor, eta: float) -> torch.Tensor:
    """`eta log E[exp(Z / eta)]` for Z ~ Bernoulli(sigmoid(logit)) (0/1 returns):
    `eta log(1 - p + p e^{1/eta})`, computed as `eta logaddexp(log(1 - p), log p + 1/eta)` (stable for any eta).
    Elementwise: (...) -> (...)."""
    logit = logit.float()
    return eta * torch.logaddexp(F.logsigmoid(-logit), F.logsigmoid(logit) + 1.0 / eta)


def return_atoms(bins: int, low: float, high: float, device=None) -> torch.Tensor:
    """The K atoms z_k of a categorical return distribution: evenly spaced on [low, high]."""
    return torch.linspace(low, high, bins, device=device)


def categorical_value(logits: torch.Tensor, atoms: torch.Tensor, eta: float | None = None) -> torch.Tensor:
    """A categorical return distribution `p = softmax(logits)` over `atoms` read as a value: `E[Z] = sum_k p_k z_k`
    (eta None), or Q♯'s `eta log sum_k p_k exp(z_k / eta)`. logits (..., K), atoms (K,) -> (...)."""
    logits = logits.float()
    if eta is None:
        return (torch.softmax(logits, -1) * atoms).sum(-1)
    return eta * torch.logsumexp(torch.log_softmax(logits, -1) + atoms / eta, -1)


def two_hot(returns: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """The distribution on `atoms` (K,) with the mean of each return (N,) and mass on at most its two neighbouring
    atoms (C51's projection, Bellemare et al. 2017, of a point mass; returns outside the range are clipped to it):
    (N,) -> (N, K). A return equal to an atom puts all its mass there."""
    g = returns.float().clamp(float(atoms[0]), float(atoms[-1]))
    position = (g - atoms[0]) / (atoms[1] - atoms[0])  # fractional atom index
    below = position.floor().clamp(max=len(atoms) - 2).long()
    upper = position - below
    target = torch.zeros(*g.shape, len(atoms), device=g.device)
    target.scatter_(-1, below.unsqueeze(-1), (1 - upper).unsqueeze(-1))
    return target.scatter_add_(-1, (below + 1).unsqueeze(-1), upper.unsqueeze(-1))


def check_eta(eta) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or eta == float("inf"):
        raise ValueError(f"eta must be a finite number > 0 (the KL weight of Q♯'s Q_eta), got {eta!r}")
