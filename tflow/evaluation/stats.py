"""Percentile bootstrap intervals over queries: one accuracy, a paired difference, several runs pooled.

Resampling n queries with replacement and counting the right ones is a binomial draw (for a pair
of channels, a multinomial draw over the four (right, wrong) cells), so the resamples are drawn as
counts: the same distribution as resampling indices, in memory that does not grow with n. A fixed
`seed` makes every interval reproducible; it depends only on the counts, not on the query order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_interval(correct: Sequence[bool], resamples: int = RESAMPLES, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float]:
    """The `level` percentile bootstrap interval (low, high) of the accuracy of `correct`.

    Raises:
        ValueError: no queries, resamples < 1, or a level outside (0, 1).
    """
    return pooled_interval([correct], resamples, seed, level)


def pooled_interval(runs: Sequence[Sequence[bool]], resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> tuple[float, float]:
    """The interval of the mean accuracy over `runs`, resampling the queries within each run.

    Raises:
        ValueError: no run, a run with no queries, resamples < 1, or a level outside (0, 1).
    """
    _check(resamples, level)
    if not runs or not all(len(run) for run in runs):
        raise ValueError("every run needs at least one query")
    rng = np.random.default_rng(seed)
    means = np.mean([rng.binomial(len(run), sum(map(bool, run)) / len(run), resamples) / len(run)
                     for run in runs], axis=0)
    return _percentiles(means, level)


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """accuracy(a) − accuracy(b) on the same queries (a[i] and b[i] answer query i), with its
    paired bootstrap interval: (difference, low, high).

    Raises:
        ValueError: lists of different lengths, no queries, resamples < 1, or a level outside (0, 1).
    """
    _check(resamples, level)
    if len(a) != len(b):
        raise ValueError(f"paired lists must have one verdict per query each, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no queries to compare")
    n = len(a)
    only_a = sum(bool(x) and not y for x, y in zip(a, b, strict=True))
    only_b = sum(bool(y) and not x for x, y in zip(a, b, strict=True))
    cells = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n],
                                                    resamples)
    return ((only_a - only_b) / n, *_percentiles((cells[:, 0] - cells[:, 1]) / n, level))


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)
