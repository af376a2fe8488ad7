"""Unbiased pass@k from per-level (n samples, c successes) counts.

pass@k is the probability that at least one of k samples, drawn without replacement from the
n samples of a level, is a success: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", eq. 1). It uses all n samples, so it is much less noisy
than "a success among the first k" (SPEC 5.6 recommends it over the reference's any-of-8).

The ratio of binomials is computed as a product, C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i),
which never forms the huge binomials (n = 1024 overflows floats in the naive form).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one level with `n` samples of which `c` succeeded.

    Raises ValueError when a count is negative, when c > n, or when k is not in 1..n.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass@k needs non-negative counts, got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass@k: c={c} successes exceed n={n} samples")
    if k < 1 or k > n:
        raise ValueError(f"pass@k: k={k} must be between 1 and n={n} (the samples per level)")
    if n - c < k:  # every k-subset contains a success
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


def default_ks(max_n: int) -> list[int]:
    """1, 2, 4, ... up to and including the largest power of two <= max_n."""
    ks, k = [], 1
    while k <= max_n:
        ks.append(k)
        k *= 2
    return ks


def pass_at_k_table(
    counts: Sequence[tuple[int, int]], ks: Iterable[int] | None = None
) -> dict[int, float]:
    """Mean pass@k over levels, for each k in `ks`.

    counts: one (n, c) pair per level. ks defaults to 1, 2, 4, ... up to the smallest n over the
    levels, so every k is defined for every level. Returns {k: mean pass@k}, keys ascending.
    """
    counts = list(counts)
    if not counts:
        raise ValueError("pass_at_k_table needs at least one (n, c) level count")
    min_n = min(n for n, _ in counts)
    ks = default_ks(min_n) if ks is None else sorted(set(ks))
    if not ks:
        raise ValueError(f"pass_at_k_table: no k to report (smallest n over levels is {min_n})")
    if ks[-1] > min_n:
        raise ValueError(
            f"pass_at_k_table: k={ks[-1]} exceeds the smallest samples-per-level n={min_n}"
        )
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
