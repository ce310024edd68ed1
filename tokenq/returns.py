"""TD targets and returns on the token-level MDP (pure functions of tensors).

Conventions: `action_mask[b, t] = 1` iff the token after position t is an action; rewards sit
on actions; the discount applies once per action token, so environment tokens between two actions (a
user turn, a tool result) do not discount. The last action of an episode bootstraps from nothing when
the episode *terminated*, and from the final state (position `length - 1`) when it was *truncated*.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NextState(NamedTuple):
    """Where each action bootstraps from. `index` (B, T) long: the position of `s_next`;
    `bootstrap` (B, T) float: 1 where the target includes `gamma * V(s_next)`, 0 otherwise."""

    index: torch.Tensor
    bootstrap: torch.Tensor


def next_state(action_mask: torch.Tensor, attention_mask: torch.Tensor, terminated: torch.Tensor) -> NextState:
    """The next state of every action (Snell et al. 2022, multi-turn ILQL: the next state where the agent
    acts again, skipping environment tokens).

    Args:
      action_mask: (B, T), 1 at actions.  attention_mask: (B, T), 1 at real tokens (right padding).
      terminated: (B,) bool, False for truncated episodes.
    Returns:
      `NextState`; `index` is 0 wherever `bootstrap` is 0 (non-actions, terminal last actions).
    """
    batch, width = action_mask.shape
    positions = torch.arange(width, device=action_mask.device).expand(batch, width)
    big = torch.full_like(positions, width)
    act_pos = torch.where(action_mask.bool(), positions, big)
    # smallest action position >= t (reverse cumulative min), shifted to get the smallest one > t
    ge = torch.flip(torch.cummin(torch.flip(act_pos, [1]), dim=1).values, [1])
    nxt = torch.cat([ge[:, 1:], big[:, :1]], dim=1)
    is_last = nxt == width
    final_state = (attention_mask.sum(1) - 1).unsqueeze(1).expand(batch, width)
    index = torch.where(is_last, final_state, nxt)
    bootstrap = torch.where(is_last, (~terminated).unsqueeze(1).expand(batch, width), torch.ones_like(is_last))
    bootstrap = bootstrap & action_mask.bool()
    return NextState(index=index * bootstrap, bootstrap=bootstrap.float())


def td_target(
    r_t: torch.Tensor,
    v_tp1: torch.Tensor,
    bootstrap_t: torch.Tensor,
    gamma: float,
    lower_bound_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-step TD target `y_t = r_t + gamma * bootstrap_t * V(s_next_t)` (Sutton & Barto eq. 6.2).

    With `lower_bound_t` (the data's Monte-Carlo return `G_t`), `max(y_t, G_t)`: Q-Transformer's bound for
    sparse rewards (Chebotar et al. 2023, Q-Transformer) -- a return the data reached lower-bounds the optimal Q,
    so the target never falls below it while V is still learning.
    All arguments share a shape, e.g. (B, T) or (N,); `v_tp1` is V at `next_state(...).index`, and should
    carry no gradient (the caller detaches it).
    """
    y_t = r_t + gamma * bootstrap_t * v_tp1
    return y_t if lower_bound_t is None else torch.maximum(y_t, lower_bound_t)


def gather_next(values: torch.Tensor, nxt: NextState) -> torch.Tensor:
    """`values[b, nxt.index[b, t]]`: V(s_next) for every position, (B, T)."""
    return values.gather(1, nxt.index)


def discounted_returns(
    rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Monte-Carlo return-to-go at each action: `G_t = r_t + gamma * G_next(t)`, discounting once per action.

    Args: rewards, action_mask (B, T). Returns (B, T), 0 at non-action positions. Rewards after the last
    observed action are not known, so a truncated episode's return counts only what was observed.
    """
    returns = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])
    acting = action_mask.bool()
    # A backward scan: the recursion is sequential in t (no closed form for per-action discounting).
    for t in range(rewards.shape[1] - 1, -1, -1):
        carry = torch.where(acting[:, t], rewards[:, t] + gamma * carry, carry)
        returns[:, t] = torch.where(acting[:, t], carry, torch.zeros_like(carry))
    return returns


def lambda_returns(
    rewards: torch.Tensor, values: torch.Tensor, nxt: NextState, action_mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """TD(lambda) returns at each action (Sutton & Barto eq. 12.18, per action token):
    `G_t = r_t + gamma * bootstrap_t * [(1 - lam) V(s_next) + lam * G_next]`, where `G_next` is the return
    of the next action, or V of the final state when the episode was truncated.

    `lam = 1` (terminated episodes) is the Monte-Carlo return-to-go; `lam = 0` the one-step TD target.
    Args: rewards, values (B, T); `nxt` from `next_state`; action_mask (B, T). Returns (B, T), 0 at
    non-action positions; pass detached values for regression targets.
    """
    acting = action_mask.bool()
    v_next = values.gather(1, nxt.index)
    returns = torch.zeros_like(rewards)
    # Backward in t: G_t needs G at its (later) next action; a closed form does not exist for
    # per-action discounting with gaps.
    for t in range(rewards.shape[1] - 1, -1, -1):
        n_t = nxt.index[:, t]
        next_is_action = acting.gather(1, n_t.unsqueeze(1)).squeeze(1)
        g_next = torch.where(next_is_action, returns.gather(1, n_t.unsqueeze(1)).squeeze(1), v_next[:, t])
        g_t = rewards[:, t] + gamma * nxt.bootstrap[:, t] * ((1 - lam) * v_next[:, t] + lam * g_next)
        returns[:, t] = torch.where(acting[:, t], g_t, torch.zeros_like(g_t))
    return returns
