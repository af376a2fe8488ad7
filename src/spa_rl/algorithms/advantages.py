"""Advantage estimators: token-level GAE over the trained positions, whitening, GRPO.

Shapes: B = sequences (episodes) in the batch, T = token positions. A `mask` is 1 where the
position is part of the trajectory being trained (the response tokens) and 0 elsewhere (prompt,
environment text the mask excludes, padding).

Departure from the reference (SPEC 5.2 step 7, SPEC 8 item 15): RAGEN runs GAE over every column
of the sequence, masked or not. With gamma = lam = 1 that is harmless, but with gamma or lam < 1
it discounts across prompt and padding tokens. Here GAE steps only from one masked-in position to
the next masked-in position, so the discount counts response tokens only; with gamma = lam = 1
and one terminal reward R both give A_j = R - V_j and returns_j = R.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gae(
    rewards: torch.Tensor,  # (B, T) reward per position; non-zero only where mask is 1
    values: torch.Tensor,  # (B, T) critic value per position
    mask: torch.Tensor,  # (B, T) 1 = trajectory position, 0 = skipped
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over masked-in positions only.

    For the masked-in positions j_1 < ... < j_m of a row (V after the last one is 0):
        delta_i = r_{j_i} + gamma * V_{j_{i+1}} - V_{j_i}
        A_i     = delta_i + gamma * lam * A_{i+1}
        return_i = A_i + V_{j_i}
    Masked-out positions are skipped: they neither discount nor bootstrap, and get A = return = 0.
    A non-zero reward on a masked-out position raises ValueError (it would be dropped silently).

    Returns (advantages, returns), both (B, T) float32 and detached.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards, values and mask must share one (B, T) shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    if bool((rewards[~keep] != 0).any()):
        raise ValueError("gae: non-zero rewards at masked-out positions; move them into the mask")
    rewards, values = rewards.float(), values.float()
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)  # (B,)
    next_adv = torch.zeros(B, dtype=torch.float32, device=rewards.device)  # (B,)
    for t in range(T - 1, -1, -1):
        k = keep[:, t]  # (B,) rows where column t is a trajectory position
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(k, adv_t, 0.0)
        # Masked-out columns leave the carried (value, advantage) of the next position untouched.
        next_value = torch.where(k, values[:, t], next_value)
        next_adv = torch.where(k, adv_t, next_adv)
    returns = torch.where(keep, advantages + values, 0.0)
    return advantages, returns


@torch.no_grad()
def whiten(
    x: torch.Tensor,  # (...) any shape
    mask: torch.Tensor,  # same shape as x
    eps: float = 1e-8,
    shift_mean: bool = True,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and Bessel-corrected variance over mask == 1.

    shift_mean=False adds the mean back (rescale only). Masked-out positions come back as 0.
    Needs at least two masked-in entries (the unbiased variance of one value is undefined).
    """
    if x.shape != mask.shape:
        raise ValueError(f"whiten: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask.bool()
    n = int(keep.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 masked-in entries, got {n}")
    xf = x.float()
    mean = xf[keep].mean()
    var = ((xf[keep] - mean) ** 2).sum() / (n - 1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, 0.0)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor,  # (N,) one scalar score per episode
    group_ids: torch.Tensor,  # (N,) integer group id per episode (same level = same group)
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantage (score - group mean) / (group std + eps), std unbiased (torch default).

    GRPO: Shao et al. 2024, "DeepSeekMath", section 4.1 (outcome supervision).

    A group of one episode has no spread: its advantage is 0. Returns (N,) float32.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    group_ids = torch.as_tensor(group_ids, device=scores.device)
    if scores.dim() != 1 or scores.shape != group_ids.shape:
        raise ValueError(
            f"grpo_advantages: scores {tuple(scores.shape)} and group_ids "
            f"{tuple(group_ids.shape)} must both be (N,)"
        )
    _, inv = torch.unique(group_ids, return_inverse=True)  # (N,) dense group index
    G = int(inv.max()) + 1 if inv.numel() else 0
    count = scores.new_zeros(G).index_add_(0, inv, torch.ones_like(scores))  # (G,)
    mean = scores.new_zeros(G).index_add_(0, inv, scores) / count  # (G,)
    dev = scores - mean[inv]  # (N,)
    sq = scores.new_zeros(G).index_add_(0, inv, dev**2)  # (G,)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # (G,) singleton groups: 0
    # dev == 0 exactly for a singleton or an all-equal group: 0, also when eps = 0 (no 0/0).
    return torch.where(dev == 0, 0.0, dev / (std[inv] + eps))
