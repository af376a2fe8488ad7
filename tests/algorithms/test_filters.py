import pytest
import torch

from spa_rl.algorithms.filters import episode_indices, select_groups_by_reward_std


def test_keeps_highest_std_groups_in_index_order():
    scores = [
        0, 0, 0, 1,  # group 0: std 0.5
        1, 1, 1, 1,  # group 1: std 0
        0, 1, 0, 1,  # group 2: std 0.577
        5, 5, 5, 5,  # group 3: std 0
    ]  # fmt: skip
    kept, stats = select_groups_by_reward_std(scores, group_size=4, keep_ratio=0.5)
    assert kept.tolist() == [0, 2]
    assert stats["n_groups"] == 4 and stats["kept_groups"] == 2
    assert stats["in_group_std_max"] == pytest.approx(3**-0.5)
    assert stats["in_group_std_min"] == 0.0
    assert stats["in_group_std_mean"] == pytest.approx((0.5 + 3**-0.5) / 4)
    assert stats["chosen_in_group_std_mean"] == pytest.approx((0.5 + 3**-0.5) / 2)
    assert stats["chosen_in_group_std_min"] == pytest.approx(0.5)


def test_std_rev_keeps_lowest():
    scores = [0, 1, 5, 5, 0, 0, 2, 9]  # stds: 0.707, 0, 0, 6.36
    kept, stats = select_groups_by_reward_std(scores, group_size=2, keep_ratio=0.5, mode="std_rev")
    assert kept.tolist() == [1, 2]
    assert stats["chosen_in_group_std_max"] == 0.0


def test_ties_go_to_lower_group_index():
    scores = [0, 1] * 6  # six groups, all std 0.707
    kept, _ = select_groups_by_reward_std(scores, group_size=2, keep_ratio=0.5)
    assert kept.tolist() == [0, 1, 2]
    kept, _ = select_groups_by_reward_std(scores, group_size=2, keep_ratio=0.5, mode="std_rev")
    assert kept.tolist() == [0, 1, 2]


def test_reference_shape_and_at_least_one_group():
    torch.manual_seed(0)
    scores = torch.randint(0, 2, (32 * 8,)).float()
    kept, _ = select_groups_by_reward_std(scores, group_size=8)
    assert len(kept) == 8  # int(0.25 * 32)
    kept, _ = select_groups_by_reward_std(scores[:16], group_size=8, keep_ratio=0.25)
    assert len(kept) == 1  # int(0.25 * 2) = 0 -> at least 1


def test_episode_indices():
    assert episode_indices(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


@pytest.mark.parametrize(
    "scores,group_size,kw,match",
    [
        ([0, 1, 2], 2, {}, "whole groups"),
        ([0, 1], 1, {}, "group_size"),
        ([0, 1], 2, {"mode": "max"}, "mode"),
        ([0, 1], 2, {"keep_ratio": 0.0}, "keep_ratio"),
        ([], 2, {}, "whole groups"),
    ],
)
def test_bad_arguments(scores, group_size, kw, match):
    with pytest.raises(ValueError, match=match):
        select_groups_by_reward_std(scores, group_size, **kw)
