"""Q♯'s risk-seeking values from a distributional critic (Zhou et al. 2025, "Q♯: Provably Optimal
Distributional RL for LLM Post-Training").

A critic trained on rollouts of a reference policy pi_ref learns the distribution of the return-to-go Z(s, a)
under pi_ref. For any eta > 0 chosen at decoding time, `Q_eta(s, a) = eta log E[exp(Z(s, a) / eta)]` gives the
optimal policy of the KL-regularised objective `E[r] - eta KL(pi || pi_ref)`:
`pi*(a|s) ∝ pi_ref(a|s) exp(Q_eta(s, a) / eta)` (Q♯, eqs. 2-4), i.e. guided sampling with beta = 1 / eta.
Small eta -> max over the returns pi_ref can reach; large eta -> E[Z] (the plain Monte-Carlo Q).
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


def check_eta(eta) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or eta == float("inf"):
        raise ValueError(f"eta must be a finite number > 0 (the KL weight of Q♯'s Q_eta), got {eta!r}")
