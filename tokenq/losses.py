"""Objectives as pure functions of tensors.

Shapes: per-action tensors are any shape `S` (e.g. (B, T) with a mask, or (N,) gathered at action
positions); `mask` (same shape, 1 = counts) is optional and reduction is `masked_mean`. Every loss takes
`num_items`: the number of counted entries in the *global* batch (all micro-batches of an optimiser step,
all processes). With it a loss returns this micro-batch's share of the global-batch mean, so gradient
accumulation and data parallelism give the gradient of the whole batch, whatever the split (transformers'
Trainer hands this count to `compute_loss` as `num_items_in_batch`). Twin Q heads are
stacked on a leading axis K. Names follow rlax: `q_t` = Q(s_t, a_t), `v_t` = V(s_t), `y_t` = TD target.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenq.distributional import two_hot


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is 1 (all entries if `mask` is None); 0 if nothing counts.
    With `num_items`: the sum over the counted entries divided by `num_items` (the global count; see above)."""
    total = x.sum() if mask is None else (x * mask.to(x.dtype)).sum()
    if num_items is not None:
        return total / num_items
    count = x.new_tensor(float(x.numel())) if mask is None else mask.to(x.dtype).sum()
    return total / count.clamp(min=1.0)


def expectile_loss(q_t: torch.Tensor, v_t: torch.Tensor, tau: float, mask: torch.Tensor | None = None,
                   num_items=None) -> torch.Tensor:
    """IQL value loss (Kostrikov et al. 2021, eq. 5): `E[ |tau - 1(u < 0)| u^2 ]`, `u = q_t - v_t`.

    `q_t` is the min over the *target* Q heads at the taken action and carries no gradient; the minimiser
    in `v_t` is the tau-expectile of `q_t`. Shapes: `q_t`, `v_t` (S,).
    """
    u = q_t.detach() - v_t
    weight = torch.abs(tau - (u < 0).to(u.dtype))
    return masked_mean(weight * u.pow(2), mask, num_items)


def td_loss(q_t: torch.Tensor, y_t: torch.Tensor, mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """IQL Q loss (Kostrikov et al. 2021, eq. 6): `sum_i E[(Q_i(s_t, a_t) - y_t)^2]`.

    `q_t` (K, S) for K Q heads, `y_t` (S,) the TD target (no gradient: `returns.td_target` on detached V).
    """
    per_head = [masked_mean((q - y_t.detach()).pow(2), mask, num_items) for q in q_t]
    return torch.stack(per_head).sum()


def cql_loss(q_lse_t: torch.Tensor, q_t: torch.Tensor, mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """CQL(H) regulariser (Kumar et al. 2020, eq. 4) as used by ILQL (Snell et al. 2022, eq. 6):
    `sum_i E[logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t)]`, i.e. cross-entropy with Q as logits.

    `q_lse_t` (K, S) `logsumexp_a Q_i(s_t, a)` over the vocabulary (`linear_logsumexp`: no (K, S, V)
    tensor), `q_t` (K, S) Q at the taken actions.
    """
    return torch.stack([masked_mean(lse - q, mask, num_items) for lse, q in zip(q_lse_t, q_t)]).sum()


def _chunk_products(x: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """Yield `(start, w, x @ w.T)` for the row chunks `w = weight[start : start + chunk_size]`, the (N, C)
    product written into one buffer reused by every full chunk (valid until the next chunk is yielded)."""
    buffer = x.new_empty(x.shape[0], min(chunk_size, weight.shape[0]))
    for start in range(0, weight.shape[0], chunk_size):
        w = weight[start : start + chunk_size]
        yield start, w, (torch.mm(x, w.T, out=buffer) if w.shape[0] == buffer.shape[1] else x @ w.T)


class _LinearLogSumExp(torch.autograd.Function):
    """`logsumexp_v (x @ W.T + b)[:, v]` computed `chunk_size` rows of W at a time, forward and backward.

    Written by hand because autograd would keep every chunk's (N, C) logits for the backward, i.e. the whole
    (N, V) tensor again; here the backward recomputes each chunk: d lse / d logits = softmax = exp(logits - lse),
    so with the upstream gradient g: dx = g * sum_v p_v W_v, dW_v = sum_n p_nv g_n x_n, db_v = sum_n p_nv g_n.

    Profiled on CPU (N = 504 action tokens, V = 151,936, r = 32), the time went to the (N, C) element-wise
    passes and to first-touch page faults of a fresh (N, C) tensor per op, not to the matmuls. So: the bias
    (and in backward `-lse`) ride in the matmul as extra columns, `[x, 1, -lse] @ [W, b, 1].T = logits - lse`
    (no broadcast copy, no subtraction pass); every chunk reuses one buffer in place; g scales the (N, D)
    side, never an (N, C) one; dW and db come out of one matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunk_size):
        ones = x.new_ones(x.shape[0], 1)
        x_aug = torch.cat([x, ones], 1)  # (N, D + 1)
        w_aug = torch.cat([weight, bias[:, None]], 1)  # (V, D + 1)
        lse = x.new_full((x.shape[0],), float("-inf"))
        for _, _, logits in _chunk_products(x_aug, w_aug, chunk_size):
            peak = logits.amax(1, keepdim=True)
            chunk_lse = logits.sub_(peak).exp_().sum(1).log_().add_(peak[:, 0])
            lse = torch.logaddexp(lse, chunk_lse)
        ctx.save_for_backward(x, weight, bias, lse)
        ctx.chunk_size = chunk_size
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        x, weight, bias, lse = ctx.saved_tensors
        n, d = x.shape
        ones = x.new_ones(n, 1)
        x_aug = torch.cat([x, ones, -lse[:, None]], 1)  # (N, D + 2)
        w_aug = torch.cat([weight, bias[:, None], torch.ones_like(bias)[:, None]], 1)  # (V, D + 2)
        xg = torch.cat([x, ones], 1) * grad_lse[:, None]  # (N, D + 1): g on the small side
        grad_x = x.new_zeros(n, d + 2)
        grad_wb = x.new_empty(weight.shape[0], d + 1) if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None
        for start, w, p in _chunk_products(x_aug, w_aug, ctx.chunk_size):
            p.exp_()  # softmax over the vocabulary, this chunk's columns: (N, C)
            grad_x.addmm_(p, w)
            if grad_wb is not None:
                torch.mm(p.T, xg, out=grad_wb[start : start + w.shape[0]])
        grad_x = grad_x[:, :d] * grad_lse[:, None]
        grad_w = grad_wb[:, :d] if ctx.needs_input_grad[1] else None
        grad_b = grad_wb[:, d] if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def linear_logsumexp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """`torch.logsumexp(x @ weight.T + bias, -1)` without the (N, V) logits: x (N, D), weight (V, D), bias (V,)
    -> (N,). Peak extra memory O(N * chunk_size + V * D) in forward and backward (CQL's logsumexp over a
    vocabulary of 150k tokens for thousands of action tokens would otherwise cost gigabytes per Q head)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32 like the heads, also under bf16 autocast
    with torch.autocast(x.device.type, enabled=False):
        return _LinearLogSumExp.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), chunk_size)


def awac_loss(
    logits_t: torch.Tensor,
    a_t: torch.Tensor,
    adv_t: torch.Tensor,
    beta: float,
    max_weight: float,
    mask: torch.Tensor | None = None,
    num_items=None,
) -> torch.Tensor:
    """Advantage-weighted policy loss (AWAC, Nair et al. 2020, eq. 12):
    `E[min(exp(beta * A(s_t, a_t)), max_weight) * CE(logits_t, a_t)]`, weight without gradient.

    `beta = 0` is plain behaviour cloning (ILQL's pi_beta, Snell et al. 2022). Shapes: `logits_t` (S, V),
    `a_t` (S,), `adv_t` (S,).
    """
    weight = torch.exp(beta * adv_t.detach()).clamp(max=max_weight)
    ce = F.cross_entropy(logits_t.float(), a_t, reduction="none")
    return masked_mean(weight * ce, mask, num_items)


def awr_loss(logits_t: torch.Tensor, a_t: torch.Tensor, adv_t: torch.Tensor, temperature: float, max_weight: float,
             mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """Policy extraction by advantage-weighted regression from a trained, frozen critic (IQL, Kostrikov et al.
    2021, eq. 7; AWR, Peng et al. 2019): `E[min(exp(A(s_t, a_t) / temperature), max_weight) * CE(logits_t, a_t)]`,
    the LM regressed on the data's actions, weighted without gradient. `adv_t = Qbar(s_t, a_t) - V(s_t)` comes
    from the critic, in its reward units; temperature -> 0 clones only the best actions, -> inf all of them.
    The same weighted cross-entropy as `awac_loss` with `beta = 1 / temperature` (there a regulariser while Q
    trains, here the extraction of a deployable policy). Shapes: `logits_t` (S, V), `a_t` (S,), `adv_t` (S,).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return awac_loss(logits_t, a_t, adv_t, 1.0 / temperature, max_weight, mask, num_items)


def best_of_n_targets(candidates_t: torch.Tensor, q_candidates_t: torch.Tensor) -> torch.Tensor:
    """The candidate the critic ranks first at each state: `candidates_t[argmax_j q_candidates_t]` (ties: the
    first). Shapes: `candidates_t` (S, N) token ids, `q_candidates_t` (S, N) -> (S,)."""
    return candidates_t.gather(-1, q_candidates_t.argmax(-1, keepdim=True)).squeeze(-1)


def best_of_n_loss(logits_t: torch.Tensor, candidates_t: torch.Tensor, q_candidates_t: torch.Tensor,
                   mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """Best-of-N policy extraction (Digi-Q, Bai et al. 2025, its "Best-of-N policy extraction"
    objective): at each state N actions are sampled from the
    current policy, the critic ranks them, and the policy is trained by cross-entropy on the best one:
    `E[-log pi(a*_t | s_t)]`, `a*_t = argmax_{a in {a_1..a_N} ~ pi(.|s_t)} Q(s_t, a)` (`best_of_n_targets`).
    Shapes: `logits_t` (S, V), `candidates_t` (S, N), `q_candidates_t` (S, N)."""
    target = best_of_n_targets(candidates_t, q_candidates_t.detach())
    return masked_mean(F.cross_entropy(logits_t.float(), target, reduction="none"), mask, num_items)


def mc_value_loss(v_t: torch.Tensor, g_t: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None,
                  num_items=None) -> torch.Tensor:
    """Monte-Carlo value regression on the return-to-go `g_t` (CD-FUDGE, Yang & Klein 2021; Q-probes,
    Li et al. 2024, eq. 2; process reward models): `mse`: `E[(v_t - g_t)^2]`; `bce` for 0/1 returns:
    `E[-g log sigmoid(v) - (1 - g) log(1 - sigmoid(v))]`, where `v_t` is the logit of the success probability.
    Shapes: `v_t` (..., S) (e.g. K heads stacked on a leading axis, summed), `g_t` (S,).
    """
    if kind == "mse":
        per = (v_t - g_t.detach()).pow(2)
    elif kind == "bce":
        per = F.binary_cross_entropy_with_logits(v_t, g_t.detach().expand_as(v_t), reduction="none")
    else:
        raise ValueError(f"kind must be mse or bce, got {kind!r}")
    per = per.reshape(-1, per.shape[-1])
    return torch.stack([masked_mean(row, mask, num_items) for row in per]).sum()


def categorical_value_loss(logits_t: torch.Tensor, g_t: torch.Tensor, atoms: torch.Tensor, mask: torch.Tensor | None = None,
                           num_items=None) -> torch.Tensor:
    """Distributional Monte-Carlo regression (Q♯, Zhou et al. 2025, the maximum-likelihood fit of the return
    distribution under the data's policy; C51's projection, Bellemare et al. 2017): the cross-entropy
    `E[-sum_k two_hot(g_t)_k log softmax(logits_t)_k]` of the return-to-go `g_t` projected on the atoms.
    Shapes: `logits_t` (S, K), `g_t` (S,), `atoms` (K,)."""
    target = two_hot(g_t.detach(), atoms)
    return masked_mean(-(target * torch.log_softmax(logits_t.float(), -1)).sum(-1), mask, num_items)


def action_logprob(logits_t: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """`log pi(a_t|s_t) = logits_t[a_t] - logsumexp(logits_t)`: logits_t (S, V), a_t (S,) -> (S,), in fp32.
    Unlike `log_softmax(...).gather(...)`, no second (S, V) tensor is kept (the policy term of DQO)."""
    logits_t = logits_t.float()
    return logits_t.gather(-1, a_t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits_t, -1)


def dqo_policy_loss(
    logratio_t: torch.Tensor,
    v_t: torch.Tensor,
    y_t: torch.Tensor,
    *,
    beta: float,
    max_weight: float,
    mask: torch.Tensor | None = None,
    num_items=None,
) -> torch.Tensor:
    """DQO policy loss (Ji, Liu et al. 2024, "Direct Q-function Optimization", arXiv:2410.09302, the policy
    objective of its method section): the LM is the Q-function,
    `Q_theta(s, a) = beta log(pi_theta / pi_ref)(a|s) + V(s)`, fitted to the Bellman target `y_t` on the
    data's actions: `E[w_t (beta * logratio_t + V(s_t) - y_t)^2]`, V and `y_t` held fixed, with the clipped
    importance weight `w_t = min(pi_theta / pi_ref (a_t|s_t), max_weight)` (no gradient) reweighting
    behaviour data towards the policy's own actions. `y_t = r_t + gamma V(s_{t+1})` is the one-step soft
    Bellman target; the lambda-return (`returns.lambda_returns`) its multi-step form (lambda = 1: the
    Monte-Carlo return, so that the target needs no V of the state after the action).
    Shapes (S,): `logratio_t = log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)`, `v_t`, `y_t`.
    """
    weight = torch.exp(logratio_t.detach()).clamp(max=max_weight)
    residual = beta * logratio_t + v_t.detach() - y_t.detach()
    return masked_mean(weight * residual.pow(2), mask, num_items)


class IQLLosses(NamedTuple):
    total: torch.Tensor
    q: torch.Tensor
    v: torch.Tensor
    cql: torch.Tensor
    awac: torch.Tensor


def iql_loss(
    q_t: torch.Tensor,
    q_lse_t: torch.Tensor,
    target_q_t: torch.Tensor,
    v_t: torch.Tensor,
    y_t: torch.Tensor,
    logits_t: torch.Tensor,
    a_t: torch.Tensor,
    *,
    tau: float,
    cql_scale: float,
    awac_scale: float,
    awac_beta: float,
    awac_max_weight: float,
    num_items=None,
) -> IQLLosses:
    """ILQL objective (Snell et al. 2022, eq. 7): `L_Q + L_V + cql_scale L_CQL + awac_scale L_AWAC`.

    At gathered action positions: `q_t` (K, N) online Q heads at the taken action and `q_lse_t` (K, N) their
    logsumexp over the vocabulary (`linear_logsumexp`; unused, may be None, for `cql_scale = 0`);
    `target_q_t` (K, N) target heads at the taken action; `v_t` (N,); `y_t` (N,) TD targets; `logits_t`
    (N, V) LM logits (unused, may be None, for `awac_scale = 0`); `a_t` (N,) actions; `num_items` the
    global action count (None: this batch's N).
    """
    qbar_t = target_q_t.min(dim=0).values
    l_q = td_loss(q_t, y_t, num_items=num_items)
    l_v = expectile_loss(qbar_t, v_t, tau, num_items=num_items)
    l_cql = cql_loss(q_lse_t, q_t, num_items=num_items) if cql_scale else q_t.new_zeros(())
    l_awac = (awac_loss(logits_t, a_t, qbar_t - v_t, awac_beta, awac_max_weight, num_items=num_items)
              if awac_scale else q_t.new_zeros(()))
    total = l_q + l_v + cql_scale * l_cql + awac_scale * l_awac
    return IQLLosses(total=total, q=l_q, v=l_v, cql=l_cql, awac=l_awac)
