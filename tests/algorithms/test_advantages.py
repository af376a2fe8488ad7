import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_rl.algorithms.advantages import gae, grpo_advantages, whiten


def textbook_gae(rewards, values, gamma, lam):
    # Plain single-row GAE over every position, V after the end = 0.
    T = len(rewards)
    adv, next_adv, next_v = [0.0] * T, 0.0, 0.0
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_v - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t], next_v = next_adv, values[t]
    return adv


def test_terminal_reward_gamma_lam_one_gives_R_minus_V():
    # Prompt (2 tokens, masked out), 4 response tokens, 1 pad: reward R = 3 on the last one.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0]], dtype=torch.float32)
    values = torch.tensor([[5.0, 5.0, 0.5, 1.0, 2.0, -1.0, 7.0]])
    rewards = torch.zeros(1, 7)
    rewards[0, 5] = 3.0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_j = R - V_j on the response; 0 elsewhere. returns = R.
    assert torch.allclose(adv, torch.tensor([[0, 0, 2.5, 2.0, 1.0, 4.0, 0]]))
    assert torch.allclose(ret, torch.tensor([[0, 0, 3.0, 3.0, 3.0, 3.0, 0]]))


def test_gamma_lam_below_one_skip_masked_gaps():
    # Two assistant turns (positions 1-2 and 5) separated by env tokens 3-4 (masked out).
    # Values 9 on masked-out positions must never enter the computation.
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0, 9.0, 1.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # gamma * lam = 0.25. Walk the masked positions 5, 2, 1 backwards:
    # pos 5: delta = 2 + 0.5*0   - 1.0 = 1.0   A = 1.0
    # pos 2: delta = 1 + 0.5*1.0 - 1.0 = 0.5   A = 0.5 + 0.25*1.0  = 0.75
    # pos 1: delta = 0 + 0.5*1.0 - 0.5 = 0.0   A = 0.0 + 0.25*0.75 = 0.1875
    expected = torch.tensor([[0, 0.1875, 0.75, 0, 0, 1.0, 0]])
    assert torch.allclose(adv, expected)
    # returns = A + V: 0.6875, 1.75, 2.0
    assert torch.allclose(ret, torch.tensor([[0, 0.6875, 1.75, 0, 0, 2.0, 0]]))


def test_full_mask_matches_textbook_and_rows_are_independent():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    adv, ret = gae(rewards, values, torch.ones(3, 6), gamma=0.9, lam=0.8)
    for b in range(3):
        want = textbook_gae(rewards[b].tolist(), values[b].tolist(), 0.9, 0.8)
        assert torch.allclose(adv[b], torch.tensor(want), atol=1e-6)
    assert torch.allclose(ret, adv + values)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=12),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**16),
)
def test_gapped_row_equals_compacted_row(mask_bits, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([mask_bits], dtype=torch.float32)
    values = torch.randn(1, len(mask_bits), generator=g)
    rewards = torch.randn(1, len(mask_bits), generator=g) * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    keep = mask[0].bool()
    want = textbook_gae(rewards[0, keep].tolist(), values[0, keep].tolist(), gamma, lam)
    assert torch.allclose(adv[0, keep], torch.tensor(want, dtype=torch.float32), atol=1e-5)
    assert torch.all(adv[0, ~keep] == 0) and torch.all(ret[0, ~keep] == 0)


def test_gae_rejects_rewards_outside_mask_and_bad_shapes():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="masked-out"):
        gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), mask, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        gae(torch.zeros(1, 3), torch.zeros(1, 4), mask, 1.0, 1.0)


def test_gae_is_detached_and_float32():
    values = torch.zeros(1, 3, dtype=torch.bfloat16, requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), values, torch.ones(1, 3), 1.0, 1.0)
    assert adv.dtype == ret.dtype == torch.float32
    assert not adv.requires_grad


def test_whiten_known_numbers_ignores_masked_out():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    out = whiten(x, mask, eps=0.0)
    # over {1, 2, 3, 4}: mean 2.5, Bessel variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = (5 / 3) ** 0.5
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])
    assert torch.allclose(out, expected)
    kept = out[mask.bool()]
    assert kept.mean().abs() < 1e-6 and torch.isclose(kept.std(), torch.tensor(1.0))


def test_whiten_without_mean_shift_keeps_the_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = whiten(x, torch.ones(4), eps=0.0, shift_mean=False)
    s = (5 / 3) ** 0.5
    assert torch.allclose(out, (x - 2.5) / s + 2.5)


def test_whiten_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))


def test_grpo_advantages_per_group():
    scores = torch.tensor([1.0, 0.0, 5.0, 2.0, 2.0, 3.0, 9.0])
    groups = torch.tensor([7, 7, 3, 3, 3, 3, 0])  # any ids, any order; group 0 is a singleton
    adv = grpo_advantages(scores, groups, eps=0.0)
    # group 7: {1, 0} mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.7071 = +-0.7071
    assert torch.allclose(adv[:2], torch.tensor([0.5, -0.5]) / 0.5**0.5)
    # group 3: {5, 2, 2, 3} mean 3, squared deviations 4+1+1+0 = 6, std sqrt(6/3) = sqrt(2)
    assert torch.allclose(adv[2:6], torch.tensor([2.0, -1.0, -1.0, 0.0]) / 2**0.5)
    assert adv[6] == 0.0  # a lone episode has nothing to compare with


def test_grpo_equal_scores_give_zero():
    adv = grpo_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert torch.all(adv == 0)
