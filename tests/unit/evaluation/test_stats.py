"""Bootstrap intervals: known cases, the width a binomial interval has, pairing, pooling and bad input."""

import random

import numpy as np
import pytest

from tflow.evaluation.stats import bootstrap_interval, joint_interval, paired_difference


def test_all_right_and_all_wrong_have_degenerate_intervals():
    assert bootstrap_interval([True] * 30) == (1.0, 1.0)
    assert bootstrap_interval([False] * 30) == (0.0, 0.0)


def test_a_fifty_fifty_interval_has_the_binomial_width():
    low, high = bootstrap_interval([True, False] * 200)
    assert low < 0.5 < high
    assert high - low == pytest.approx(2 * 1.96 * (0.25 / 400) ** 0.5, abs=0.01)  # normal approximation: 0.098


def test_drawing_counts_matches_resampling_query_indices():
    verdicts = np.array([True] * 120 + [False] * 80)
    rng = np.random.default_rng(1)
    naive = verdicts[rng.integers(0, 200, (8000, 200))].mean(axis=1)
    assert bootstrap_interval(verdicts.tolist(), resamples=8000) == pytest.approx(
        tuple(np.quantile(naive, [0.025, 0.975])), abs=0.015)


def test_intervals_are_reproducible_and_ignore_query_order():
    rng = random.Random(0)
    verdicts = [rng.random() < 0.3 for _ in range(100)]
    shuffled = random.Random(1).sample(verdicts, len(verdicts))
    assert bootstrap_interval(verdicts) == bootstrap_interval(shuffled) == bootstrap_interval(verdicts, seed=0)
    (low50, high50), (low95, high95) = bootstrap_interval(verdicts, level=0.5), bootstrap_interval(verdicts)
    assert low95 < low50 < high50 < high95


def test_identical_channels_differ_by_exactly_zero():
    verdicts = [i % 3 == 0 for i in range(50)]
    assert paired_difference(verdicts, verdicts) == (0.0, 0.0, 0.0)


def test_paired_difference_is_the_accuracy_difference_with_a_narrow_interval_when_channels_agree():
    a = [True] * 60 + [False] * 40
    b = [True] * 55 + [False] * 45  # b is a minus 5 queries: the channels agree on 95 of 100
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(0.05) and 0.0 <= low <= diff <= high
    unpaired = bootstrap_interval(a)
    assert high - low < (unpaired[1] - unpaired[0]) / 2  # pairing removes the queries' shared difficulty
    assert paired_difference([True] * 10, [False] * 10) == (1.0, 1.0, 1.0)
    assert paired_difference(b, a)[0] == pytest.approx(-0.05)


def test_the_mean_of_runs_on_the_same_queries_resamples_the_queries_once_for_all():
    run = [True, False, False, True, True] * 20
    assert joint_interval([run, run, run]) == joint_interval([run])  # identical runs: no narrower than one
    one = joint_interval([run])
    assert one[0] < 0.6 < one[1] and one == pytest.approx(bootstrap_interval(run), abs=0.02)
    assert joint_interval([run, [not v for v in run]]) == (0.5, 0.5)  # complementary runs: always one half
    low, high = joint_interval([run, [True] * 30 + [False] * 70])
    assert low < (0.6 + 0.3) / 2 < high


@pytest.mark.parametrize("call, message", [
    (lambda: paired_difference([True], [True, False]), "got 1 and 2"),
    (lambda: paired_difference([], []), "no queries"),
    (lambda: bootstrap_interval([]), "at least one query"),
    (lambda: joint_interval([]), "at least one query"),
    (lambda: joint_interval([[True], [True, False]]), r"the runs must answer the same queries; they answered \[1, 2\]"),
    (lambda: bootstrap_interval([True], resamples=0), "resamples must be >= 1"),
    (lambda: bootstrap_interval([True], level=1.0), r"level must be in \(0, 1\)"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
