"""Uncertainty of the reported success rates: counts in, (estimate, standard error) out.

Validation plays `samples` episodes on each of a fixed set of levels. The episodes of one level
are not independent draws of the run's success rate (a level the policy solves tends to be solved
by all its samples), so a binomial standard error over episodes understates the noise. Here the
level is the unit: Pass@1 is the mean of the per-level success rates, and its standard error is
their standard deviation over sqrt(levels).

A before/after comparison on the same levels (a run's first and last validation) is paired by
level: the per-level differences carry the comparison's noise, and the levels' own difficulty,
common to both sides, cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Student's t quantiles t(0.975, df) for df = 1..30 (beyond: the normal 1.96), for 95% intervals
# of a mean over a few seeds.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sample standard deviation / sqrt(n) (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    mean, se = mean_se(values)  # se is 0 for a single value
    df = len(values) - 1
    t = T975[df - 1] if 1 <= df <= len(T975) else 1.96
    return mean, t * se


def level_rates(counts: Sequence[tuple[int, int]]) -> list[float]:
    """Per-level success rates c / n from (n samples, c successes) pairs."""
    rates = []
    for n, c in counts:
        if n < 1 or not 0 <= c <= n:
            raise ValueError(f"a level count needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
        rates.append(c / n)
    return rates


def pass_at_1_se(counts: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Pass@1 (the mean per-level success rate) and its standard error over levels."""
    return mean_se(level_rates(counts))


def paired_difference(before: Sequence[tuple[int, int]], after: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Pass@1 after minus before on the same levels, and the standard error of that difference,
    from the per-level differences of success rates (level i of `before` is level i of `after`)."""
    if len(before) != len(after):
        raise ValueError(f"a paired comparison needs the same levels on both sides, got {len(before)} and "
                         f"{len(after)} levels")
    return mean_se([a - b for b, a in zip(level_rates(before), level_rates(after), strict=True)])
