"""Percentile bootstrap intervals over queries: one accuracy, a paired difference, the mean of several runs.

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
    _check(resamples, level)
    if not correct:
        raise ValueError("an interval needs at least one query")
    n = len(correct)
    rng = np.random.default_rng(seed)
    return _percentiles(rng.binomial(n, sum(map(bool, correct)) / n, resamples) / n, level)


def joint_interval(runs: Sequence[Sequence[bool]], resamples: int = RESAMPLES, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, float]:
    """The interval of the mean accuracy over `runs` that answered the same queries (runs[r][i]
    answers query i): one resample of the queries serves every run, so what the runs share (the
    same easy and hard queries) is not counted as independent evidence. Identical runs give one
    run's width; runs right on complementary halves give a mean of exactly one half.

    Each query's score (how many runs were right on it) takes one of len(runs) + 1 values, so a
    resample is a multinomial draw over those values.

    Raises:
        ValueError: no run, a run with no queries, runs of different lengths, resamples < 1, or a
            level outside (0, 1).
    """
    _check(resamples, level)
    if not runs or not all(len(run) for run in runs):
        raise ValueError("every run needs at least one query")
    if len({len(run) for run in runs}) != 1:
        raise ValueError(f"the runs must answer the same queries; they answered {sorted({len(r) for r in runs})}")
    k, n = len(runs), len(runs[0])
    counts = np.bincount(np.asarray(runs, dtype=bool).sum(axis=0), minlength=k + 1)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # [resamples, k + 1]
    return _percentiles(draws @ (np.arange(k + 1) / k) / n, level)


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
