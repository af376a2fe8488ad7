import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa_rl.algorithms.stats import level_rates, mean_ci, mean_se, paired_difference, pass_at_1_se


def test_mean_ci_is_a_t_interval():
    assert mean_ci([0.5]) == (0.5, 0.0)
    mean, half = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_pass_at_1_se_is_over_levels_not_episodes():
    # two levels, 4 samples each: one always solved, one never. Pass@1 is 0.5 either way, but the
    # per-level rates (1, 0) differ by 1: the SE is sd(1, 0) / sqrt(2) = 0.5, far above the
    # binomial SE over 8 episodes (sqrt(0.25 / 8) = 0.18) that would treat samples as independent
    p1, se = pass_at_1_se([(4, 4), (4, 0)])
    assert p1 == 0.5 and se == pytest.approx(0.5)
    # every level at the same rate: no spread over levels
    assert pass_at_1_se([(4, 2), (4, 2), (4, 2)]) == (0.5, 0.0)


def test_paired_difference_cancels_level_difficulty():
    before = [(4, 0), (4, 4), (4, 1), (4, 3)]
    after = [(4, 1), (4, 4), (4, 2), (4, 4)]  # every level up by 0 or 1/4
    diff, se = paired_difference(before, after)
    assert diff == pytest.approx(3 / 16)
    rates = [0.25, 0.0, 0.25, 0.25]
    assert se == pytest.approx(math.sqrt(sum((r - 3 / 16) ** 2 for r in rates) / 3 / 4))
    # the unpaired SEs are far larger: the levels' spread in difficulty dominates them
    assert se < pass_at_1_se(before)[1] / 3


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)).map(lambda t: (t[0], min(t[0], t[1]))),
                min_size=1, max_size=40))
def test_paired_difference_with_itself_is_zero(counts):
    assert paired_difference(counts, counts) == (0.0, 0.0)
    assert mean_se(level_rates(counts))[0] == pytest.approx(sum(c / n for n, c in counts) / len(counts))


@pytest.mark.parametrize("bad, needle", [([(0, 0)], "n=0"), ([(4, 5)], "c=5"), ([(4, -1)], "c=-1")])
def test_bad_counts_are_named(bad, needle):
    with pytest.raises(ValueError, match=needle):
        pass_at_1_se(bad)


def test_paired_difference_needs_the_same_levels():
    with pytest.raises(ValueError, match="2 and 1 levels"):
        paired_difference([(4, 1), (4, 2)], [(4, 1)])
