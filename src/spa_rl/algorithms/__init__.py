"""Pure functions of the SPA recipe: tensors (or counts) in, tensors (or numbers) out; no I/O.

- passk: unbiased pass@k from per-level (n, c) counts.
- advantages: GAE over the trained positions, whitening, GRPO group-normalised advantages.
- losses: clipped/dual-clipped PPO policy loss, the actor's objective, clipped value loss, entropy,
  masked reductions with mini-batch denominators for gradient accumulation.
- filters: keep the groups with the largest in-group reward std.
- stats: standard errors of Pass@1 over levels, paired before/after differences, t-intervals.
"""

from spa_rl.algorithms.advantages import gae, grpo_advantages, whiten
from spa_rl.algorithms.filters import episode_indices, select_groups_by_reward_std
from spa_rl.algorithms.losses import (
    actor_loss,
    aggregate_loss,
    entropy_from_logits,
    logprobs_from_logits,
    loss_denominator,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    value_loss,
)
from spa_rl.algorithms.passk import pass_at_k, pass_at_k_table

__all__ = [
    "actor_loss",
    "aggregate_loss",
    "entropy_from_logits",
    "episode_indices",
    "gae",
    "grpo_advantages",
    "logprobs_from_logits",
    "loss_denominator",
    "masked_mean",
    "masked_sum",
    "pass_at_k",
    "pass_at_k_table",
    "ppo_policy_loss",
    "select_groups_by_reward_std",
    "value_loss",
    "whiten",
]
