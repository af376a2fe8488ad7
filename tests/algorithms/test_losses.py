import math

import pytest
import torch

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


def one_token(ratio: float, adv: float, **kw):
    # A single token with pi/pi_old = ratio: logprobs = log(ratio), old = 0.
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = ppo_policy_loss(
        logprobs, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kw
    )
    loss.backward()
    return loss.item(), stats, logprobs.grad.item()


def test_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(2, 3), adv, mask)
    # r = 1 everywhere: l = -A; token mean over 4 tokens: -(1 - 2 + 0.5 + 3) / 4 = -0.625
    assert loss.item() == pytest.approx(-0.625)
    loss.backward()
    # d/dlogp of -A*exp(logp - old) / N at r = 1 is -A / 4, 0 on masked-out tokens
    assert torch.allclose(logprobs.grad, -adv * mask / 4)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_mean"] == 1


def test_positive_advantage_inside_clip_range():
    # A = 1, r = 1.1 < 1.28: l = -1.1, gradient -A*r = -1.1
    loss, stats, grad = one_token(1.1, 1.0)
    assert loss == pytest.approx(-1.1)
    assert grad == pytest.approx(-1.1)
    assert stats["clipfrac"] == 0


def test_positive_advantage_above_upper_clip():
    # A = 1, r = 1.5: unclipped -1.5, clipped -1 * 1.28 = -1.28; max -> -1.28, no gradient
    loss, stats, grad = one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.28)
    assert grad == 0.0
    assert stats["clipfrac"] == 1 and stats["clipfrac_upper"] == 1 and stats["clipfrac_lower"] == 0


def test_positive_advantage_below_lower_clip_is_not_clipped():
    # A = 1, r = 0.5: unclipped -0.5, clipped -0.8; max (pessimistic) -> -0.5, gradient flows
    loss, stats, grad = one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5)
    assert grad == pytest.approx(-0.5)
    assert stats["clipfrac"] == 0


def test_negative_advantage_below_lower_clip():
    # A = -1, r = 0.5: unclipped 0.5, clipped 1 * 0.8 = 0.8; max -> 0.8, no gradient
    loss, stats, grad = one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert stats["clipfrac_lower"] == 1 and stats["clipfrac_upper"] == 0


def test_negative_advantage_large_ratio_below_dual_bound():
    # A = -1, r = 2: unclipped 2.0, clipped 1.28; max -> 2.0; dual bound -A*3 = 3 > 2: keep 2.0
    loss, stats, grad = one_token(2.0, -1.0)
    assert loss == pytest.approx(2.0)
    assert grad == pytest.approx(2.0)
    assert stats["dual_clipfrac"] == 0 and stats["clipfrac"] == 0


def test_negative_advantage_dual_clip_caps_the_loss():
    # A = -1, r = 5: max(5.0, 1.28) = 5.0; dual bound 3.0 -> min(5.0, 3.0) = 3.0, no gradient
    loss, stats, grad = one_token(5.0, -1.0)
    assert loss == pytest.approx(3.0)
    assert grad == 0.0
    assert stats["dual_clipfrac"] == 1


def test_dual_clip_disabled_and_validated():
    # A = -2, r = 5 without dual clip: max(10, 2.56) = 10
    loss, stats, _ = one_token(5.0, -2.0, dual_clip=None)
    assert loss == pytest.approx(10.0)
    assert stats["dual_clipfrac"] == 0
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(1.0, 1.0, dual_clip=0.5)


def test_dual_clip_never_touches_positive_advantages():
    # A = +1, r = 5: clipped to -1.28 by the upper clip; the dual bound (for A < 0) is ignored
    loss, stats, _ = one_token(5.0, 1.0)
    assert loss == pytest.approx(-1.28)
    assert stats["dual_clipfrac"] == 0


def test_approx_kl_is_k3():
    # r = 2: (r - 1) - log r = 1 - 0.6931 = 0.3069
    _, stats, _ = one_token(2.0, 1.0)
    assert stats["approx_kl"].item() == pytest.approx(1 - math.log(2))
    assert stats["ratio_mean"].item() == pytest.approx(2.0)


def test_masked_out_tokens_never_matter_even_if_nan():
    logprobs = torch.tensor([[0.0, float("nan")]], requires_grad=True)
    adv = torch.tensor([[1.0, float("inf")]])
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 2), adv, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_loss_aggregation_modes():
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    # token-mean: (1 + 1 + 1 + 4) / 4 tokens = 1.75
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(1.75)
    # seq-mean-token-mean: (mean{1,1,1} + mean{4}) / 2 sequences = 2.5; empty row 3 is skipped
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(per_token, mask, "sum")


def test_policy_loss_seq_mean_token_mean():
    # r = 1: per-token loss -A. Row 1: A = 1, 1, 1; row 2: A = 4 (one token).
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    z = torch.zeros(2, 3)
    loss, _ = ppo_policy_loss(z, z, adv, mask, loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-(1.0 + 4.0) / 2)


def test_value_loss_inside_clip_range():
    # V = 1.2, V_old = 1.0 (|dV| = 0.2 <= 0.5), R = 2: both terms (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64
    v = torch.tensor([[1.2]], requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.32)
    loss.backward()
    assert v.grad.item() == pytest.approx(1.2 - 2.0)  # d/dV 0.5 (V - R)^2
    assert stats["vf_clipfrac"] == 0


def test_value_loss_clipped_term_wins():
    # V = 2, V_old = 1, R = 2: unclipped 0; clipped V = 1.5 -> (1.5 - 2)^2 = 0.25; 0.5 * 0.25
    v = torch.tensor([[2.0]], requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    assert v.grad.item() == 0.0  # the clipped value does not move with V
    assert stats["vf_clipfrac"] == 1


def test_value_loss_unclipped_term_wins_outside_range():
    # V = 0, V_old = 1, R = 2: unclipped 4; clipped V = 0.5 -> 2.25; max 4 -> 0.5 * 4 = 2
    v = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(2.0)
    assert stats["vf_clipfrac"] == 0


def test_value_loss_without_clip():
    v, v_old, ret = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    loss, _ = value_loss(v, v_old, ret, torch.ones(1, 1), clip=None)
    assert loss.item() == pytest.approx(0.5 * 4.0)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    _, perfect = value_loss(ret.clone(), ret, ret, mask)
    assert perfect["explained_variance"].item() == pytest.approx(1.0)
    _, mean_only = value_loss(torch.full((1, 4), 2.5), torch.full((1, 4), 2.5), ret, mask)
    assert mean_only["explained_variance"].item() == pytest.approx(0.0)
    _, flat = value_loss(ret, ret, torch.ones(1, 4), mask)
    assert math.isnan(flat["explained_variance"].item())  # Var[R] = 0: undefined


def test_entropy_from_logits():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 5)), torch.full((2,), math.log(5)))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(3, 4, 7, dtype=torch.bfloat16)
    want = torch.distributions.Categorical(logits=logits.float()).entropy()
    got = entropy_from_logits(logits)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)


def test_logprobs_from_logits():
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(logprobs_from_logits(logits, labels), want, atol=1e-6)


def test_masked_mean_and_sum():
    x = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_sum(x, mask).item() == 9.0
    assert masked_mean(x, mask).item() == 3.0
    assert torch.allclose(masked_mean(x, mask, dim=-1), torch.tensor([1.0, 4.0]))
    assert torch.allclose(masked_mean(x, mask, dim=0), torch.tensor([2.0, 5.0]))
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0  # nothing masked in: 0, not nan


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_contributions_add_up_to_the_mini_batch_loss(loss_agg):
    # Rows of 3, 1, 0 and 2 trained tokens, split 2 + 2 rows: with the mini-batch's
    # denominator the two contributions sum to the whole batch's loss.
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    whole = aggregate_loss(per_token, mask, loss_agg)
    denom = loss_denominator(mask, loss_agg)
    assert denom.item() == (6 if loss_agg == "token-mean" else 3)
    parts = aggregate_loss(per_token[:2], mask[:2], loss_agg, denom) + aggregate_loss(per_token[2:], mask[2:], loss_agg, denom)
    assert parts.item() == pytest.approx(whole.item())
    # the old accumulation (each micro-batch's own mean, divided by the number of micro-batches)
    # gives another number on the same rows
    old = (aggregate_loss(per_token[:2], mask[:2], loss_agg) + aggregate_loss(per_token[2:], mask[2:], loss_agg)) / 2
    assert old.item() != pytest.approx(whole.item())
    assert loss_denominator(torch.zeros(2, 3), loss_agg).item() == 1  # never divides by zero


def test_policy_and_value_losses_take_the_denominator():
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    z = torch.zeros(1, 2)
    own, _ = ppo_policy_loss(z, z, adv, mask)
    assert own.item() == pytest.approx(0.5)  # -(1 - 2) / 2
    shared, _ = ppo_policy_loss(z, z, adv, mask, denominator=torch.tensor(8.0))
    assert shared.item() == pytest.approx(1.0 / 8)
    v, _ = value_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2), mask, denominator=4.0)
    assert v.item() == pytest.approx(0.5 * 2 / 4)


def test_actor_loss_terms():
    # r = 1, A = (1, -1): surrogate 0; entropy (2, 4) -> token mean 3; KL to a reference that
    # gives each token log-prob 0 against log pi = log 0.5: k3 = exp(log 2) - log 2 - 1
    logprobs = torch.full((1, 2), math.log(0.5), requires_grad=True)
    entropy = torch.tensor([[2.0, 4.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    loss, stats = actor_loss(logprobs, logprobs.detach(), torch.tensor([[1.0, -1.0]]), mask, entropy=entropy,
                             entropy_coef=0.1, ref_logprobs=torch.zeros(1, 2), kl_coef=0.5)
    k3 = 2.0 - math.log(2.0) - 1.0
    assert loss.item() == pytest.approx(0.0 - 0.1 * 3.0 + 0.5 * k3)
    assert stats["entropy"].item() == pytest.approx(3.0) and stats["kl_to_ref"].item() == pytest.approx(k3)
    loss.backward()
    assert torch.allclose(entropy.grad, torch.full((1, 2), -0.1 / 2))
    half, half_stats = actor_loss(logprobs, logprobs.detach(), torch.tensor([[1.0, -1.0]]), mask, entropy=entropy,
                                  entropy_coef=0.1, denominator=4.0)
    assert half.item() == pytest.approx(-0.1 * 6.0 / 4)  # the entropy sum over the mini-batch's 4 tokens
    assert half_stats["pg_loss"].item() == pytest.approx(0.0)
