"""Rollout filtering: keep the groups whose rewards disagree most (SPEC 5.2 step 4).

A group is the `group_size` episodes played on one level. A group where every episode scored the
same (all solved, all failed) has in-group std 0 and gives PPO nothing to compare; RAGEN keeps the
top 25% of groups by std (32 groups x 8 -> 8 groups -> 64 episodes per update).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FILTER_MODES = ("std", "std_rev")


def select_groups_by_reward_std(
    scores: torch.Tensor | Sequence[float],  # (n_groups * group_size,) episode scores
    group_size: int,
    keep_ratio: float = 0.25,
    mode: str = "std",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Choose groups by the unbiased std of their episode scores.

    Episodes are laid out group by group: episode i belongs to group i // group_size.
    Keeps max(1, int(keep_ratio * n_groups)) groups: "std" the highest std, "std_rev" the lowest.
    Ties go to the lower group index (a stable sort), so the choice is deterministic.

    Returns (kept_group_indices, stats): a LongTensor of group indices in ascending order, and
    in_group_std_{mean,max,min} over all groups and chosen_in_group_std_{mean,max,min} over the
    kept ones, plus n_groups and kept_groups.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode must be one of {FILTER_MODES}, got {mode!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for an in-group std, got {group_size}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if scores.numel() == 0 or scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} scores do not split into whole groups of {group_size}"
        )
    n_groups = scores.numel() // group_size
    std = scores.view(n_groups, group_size).std(dim=1)  # (n_groups,) unbiased
    n_keep = max(1, int(keep_ratio * n_groups))
    order = torch.sort(std, descending=(mode == "std"), stable=True).indices
    kept = torch.sort(order[:n_keep]).values
    chosen = std[kept]
    stats = {
        "in_group_std_mean": std.mean().item(),
        "in_group_std_max": std.max().item(),
        "in_group_std_min": std.min().item(),
        "chosen_in_group_std_mean": chosen.mean().item(),
        "chosen_in_group_std_max": chosen.max().item(),
        "chosen_in_group_std_min": chosen.min().item(),
        "n_groups": float(n_groups),
        "kept_groups": float(n_keep),
    }
    return kept, stats


def episode_indices(kept_group_indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """Episode indices (ascending) of the kept groups, for the group-by-group layout above."""
    offsets = torch.arange(group_size, device=kept_group_indices.device)
    return (kept_group_indices.long()[:, None] * group_size + offsets[None, :]).flatten()
