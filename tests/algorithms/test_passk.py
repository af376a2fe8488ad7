import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa_rl.algorithms.passk import default_ks, pass_at_k, pass_at_k_table


def brute_force(n: int, c: int, k: int) -> float:
    # Samples 0..c-1 succeed; count the k-subsets holding at least one of them.
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@st.composite
def nck(draw, max_n=9):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(nck())
def test_matches_enumeration_over_all_k_subsets(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_known_values():
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)  # pass@1 = c / n
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 1, 8) == 1.0  # all 8 samples drawn: the success is among them
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)


def test_large_n_is_stable_and_exact():
    # C(1024, 512) ~ 4e306 is at the edge of float range: the product form never builds it.
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    exact = 1 - Fraction(math.comb(1024 - 3, 100), math.comb(1024, 100))
    assert pass_at_k(1024, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 <= pass_at_k(4096, 1, 1) <= 1.0


@pytest.mark.parametrize(
    "n,c,k",
    [(4, 0, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, -1), (4, 1, 0), (0, 0, 1)],
)
def test_invalid_counts_raise(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_non_integer_counts_are_rejected():
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def test_default_ks_are_powers_of_two_up_to_n():
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(7) == [1, 2, 4]
    assert default_ks(1) == [1]


def test_table_averages_over_levels_with_default_ks():
    counts = [(8, 8), (8, 0), (8, 1)]
    table = pass_at_k_table(counts)
    assert list(table) == [1, 2, 4, 8]
    # pass@1: (1 + 0 + 1/8) / 3 ; pass@8: (1 + 0 + 1) / 3
    assert table[1] == pytest.approx((1 + 0 + 1 / 8) / 3)
    assert table[8] == pytest.approx(2 / 3)
    # pass@2 of the (8, 1) level: 1 - C(7,2)/C(8,2) = 1 - 21/28 = 1/4
    assert table[2] == pytest.approx((1 + 0 + 0.25) / 3)


def test_table_default_ks_stop_at_smallest_n():
    assert list(pass_at_k_table([(8, 2), (5, 1)])) == [1, 2, 4]


def test_table_explicit_ks_sorted_and_checked():
    assert list(pass_at_k_table([(8, 2)], ks=[4, 1, 4])) == [1, 4]
    with pytest.raises(ValueError, match="k=8"):
        pass_at_k_table([(8, 2), (4, 1)], ks=[8])
    with pytest.raises(ValueError):
        pass_at_k_table([])


@given(st.lists(nck(), min_size=1, max_size=5))
def test_table_is_monotone_in_k(levels):
    counts = [(n, c) for n, c, _ in levels]
    values = list(pass_at_k_table(counts).values())
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
