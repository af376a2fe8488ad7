"""PPO losses and masked reductions. Every loss returns (loss, stats).

Shapes: B = sequences, T = token positions, V = vocabulary. `mask` is 1 on the positions the loss
trains on. Stats are detached 0-dim float tensors, token means over the mask whatever `loss_agg`.

Loss aggregation (`loss_agg`):
- "token-mean" (default, the reference's `loss_agg_mode`): mean over every masked-in token of the
  batch, so long sequences weigh more.
- "seq-mean-token-mean": token mean inside each sequence, then mean over sequences that have at
  least one masked-in token. The reference computes "token-mean" per micro-batch of ONE sequence
  and averages micro-batches (SPEC 5.4), so this is what its updates effectively optimise.

Gradient accumulation: the mean is over the whole MINI-batch (one optimizer step), not over each
micro-batch. Compute `loss_denominator(mini_batch_mask, loss_agg)` once per mini-batch and pass it
as `denominator` to every micro-batch's loss: each micro-batch then contributes its masked sum
divided by the mini-batch's count, the contributions add up to the mini-batch's loss, and the
gradient does not depend on how the mini-batch is split. Averaging per-micro-batch means instead
(the loss of each divided by the number of micro-batches) weighs a token by the size of the
micro-batch it happened to land in. Without `denominator` a loss is its batch's own mean.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is 1. Masked-out entries may hold inf or nan: they are never read."""
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along `dim`); 0 where nothing is masked in."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def loss_denominator(mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """What `aggregate_loss` divides by, over `mask` (B, T): masked-in tokens ("token-mean") or
    sequences with at least one of them ("seq-mean-token-mean"), at least 1. Take it over a
    whole mini-batch and pass it as `denominator` to each micro-batch's losses."""
    if loss_agg == "token-mean":
        count = mask.bool().sum()
    elif loss_agg == "seq-mean-token-mean":
        count = mask.bool().any(dim=-1).sum()
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    return count.clamp(min=1).float()


def aggregate_loss(
    per_token: torch.Tensor,  # (B, T) loss per token
    mask: torch.Tensor,  # (B, T)
    loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar; see the module docstring for the two modes and for
    `denominator` (default: this batch's own `loss_denominator`)."""
    if loss_agg == "token-mean":
        total = masked_sum(per_token, mask)
    elif loss_agg == "seq-mean-token-mean":
        total = masked_mean(per_token, mask, dim=-1).sum()  # rows without tokens contribute 0
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if denominator is None:
        denominator = loss_denominator(mask, loss_agg)
    return total / denominator


def ppo_policy_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta(token), requires grad
    old_logprobs: torch.Tensor,  # (B, T) log pi_old(token) from the rollout policy
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate with asymmetric clip and dual clip (SPEC 5.3), aggregated by
    `loss_agg` (over the mini-batch when `denominator` is given; module docstring).

    Per token, with r = exp(logprobs - old_logprobs):
        l = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))   # PPO, Schulman et al. 2017
        l = min(l, -A * dual_clip)  where A < 0                        # dual clip, Ye et al. 2020
    Asymmetric "clip-higher" bounds as in DAPO (Yu et al. 2025). dual_clip=None turns it off.

    stats: clipfrac (tokens whose clipped branch is active), clipfrac_upper (A > 0, r above
    1 + clip_high), clipfrac_lower (A < 0, r below 1 - clip_low), dual_clipfrac (A < 0 and the
    dual bound is active), approx_kl (k3 = (r - 1) - log r, estimates KL(pi_old || pi_theta)),
    ratio_mean, ratio_max.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    adv = advantages.detach().float()
    # Clamp the log-ratio so a wild token cannot overflow exp; far outside any clip range anyway.
    log_ratio = (logprobs.float() - old_logprobs.detach().float()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    loss = aggregate_loss(per_token, mask, loss_agg, denominator)

    with torch.no_grad():
        r = ratio.detach()
        clipped = loss_clipped > loss_unclipped
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "clipfrac_upper": masked_mean(((adv > 0) & (r > 1.0 + clip_high)).float(), mask),
            "clipfrac_lower": masked_mean(((adv < 0) & (r < 1.0 - clip_low)).float(), mask),
            "dual_clipfrac": masked_mean(dual_active.float(), mask),
            "approx_kl": masked_mean((r - 1.0) - log_ratio.detach(), mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": torch.where(mask.bool(), r, 0.0).max() if mask.any() else r.new_zeros(()),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,  # (B, T) V_phi, requires grad
    old_values: torch.Tensor,  # (B, T) values at rollout time
    returns: torch.Tensor,  # (B, T) GAE returns
    mask: torch.Tensor,  # (B, T)
    clip: float | None = 0.5,
    loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), aggregated
    like the policy loss (`denominator`: the mini-batch's, for gradient accumulation).

    clip=None gives the plain 0.5 * (V - R)^2. stats: vf_clipfrac (tokens where the clipped term
    is the larger), explained_variance 1 - Var[R - V] / Var[R] over the mask (nan if Var[R] = 0),
    vpred_mean.
    """
    v = values.float()
    old = old_values.detach().float()
    ret = returns.detach().float()
    err_unclipped = (v - ret) ** 2
    if clip is None:
        err = err_unclipped
        clipped_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clipped = old + (v - old).clamp(-clip, clip)
        err_clipped = (v_clipped - ret) ** 2
        err = torch.maximum(err_unclipped, err_clipped)
        clipped_active = err_clipped > err_unclipped
    loss = 0.5 * aggregate_loss(err, mask, loss_agg, denominator)

    with torch.no_grad():
        vd = v.detach()
        var_ret = _masked_var(ret, mask)
        var_res = _masked_var(ret - vd, mask)
        nan = vd.new_tensor(float("nan"))
        stats = {
            "vf_clipfrac": masked_mean(clipped_active.float(), mask),
            "explained_variance": 1.0 - var_res / var_ret if var_ret > 0 else nan,
            "vpred_mean": masked_mean(vd, mask),
        }
    return loss, stats


def actor_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta at the sampling temperature, requires grad
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    entropy: torch.Tensor | None = None,  # (B, T) entropy of pi_theta, requires grad
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,  # (B, T) log pi_ref, for the KL penalty
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    loss_agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor's whole objective for one micro-batch: clipped surrogate - entropy_coef x entropy
    + kl_coef x k3 KL(pi_theta || pi_ref), every term aggregated the same way (`loss_agg`,
    `denominator`), so accumulated micro-batches give the mini-batch's gradient for each term.

    stats: those of `ppo_policy_loss`, plus pg_loss, entropy (token mean over the mask) and,
    with a reference, kl_to_ref (token mean); all are this micro-batch's own means, for logging.
    """
    pg_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                     loss_agg, denominator)
    loss = pg_loss
    own = loss_denominator(mask, loss_agg)  # this micro-batch's mean, for the log
    stats["pg_loss"] = pg_loss.detach() * (denominator / own if denominator is not None else 1.0)
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * aggregate_loss(entropy, mask, loss_agg, denominator)
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    if ref_logprobs is not None and kl_coef:
        log_r = ref_logprobs.detach().float() - logprobs.float()
        k3 = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi_theta || pi_ref), >= 0
        loss = loss + kl_coef * aggregate_loss(k3, mask, loss_agg, denominator)
        stats["kl_to_ref"] = masked_mean(k3.detach(), mask)
    return loss, stats


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (..., V) -> (...), computed in float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v. Holds a V-sized float32 copy per position: pass
    only the positions the loss uses, in chunks, for large vocabularies.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor,  # (..., V)
    labels: torch.Tensor,  # (...) token ids
) -> torch.Tensor:
    """log softmax(logits)[label] per position, (...), float32; gathers before normalising so the
    full log-softmax tensor is never stored."""
    z = logits.float()
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)
