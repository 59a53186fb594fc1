"""The statistics under the results table: the Wilson score interval of an accuracy and McNemar's
mid-p test of two models on the same points, each against published values and against a second,
independent formulation of the same quantity."""

import itertools
import math

import pytest

from lfr_ext.evaluation.intervals import wilson_interval
from lfr_ext.evaluation.paired import mcnemar_midp

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


# Newcombe 1998, "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17, Table II, method 3 (Wilson score, no continuity correction).
NEWCOMBE_1998 = [
    ((81, 263), (0.2553, 0.3662)),
    ((15, 148), (0.0624, 0.1605)),
    ((0, 20), (0.0, 0.1611)),
    ((1, 29), (0.0061, 0.1718)),
]


@pytest.mark.parametrize("counts, expected", NEWCOMBE_1998)
def test_wilson_interval_matches_published_values(counts, expected):
    low, high = wilson_interval(*counts)
    assert (round(low, 4), round(high, 4)) == expected


def test_wilson_interval_of_39_of_100():
    low, high = wilson_interval(39, 100)
    assert (round(low, 3), round(high, 3)) == (0.300, 0.488)


def _score_test_bound(k: int, n: int, upper: bool) -> float:
    """The Wilson interval's definition solved by bisection: the end of the set of p for which
    |k/n - p| <= z sqrt(p (1 - p) / n) (the score test does not reject), no closed form used."""
    p_hat = k / n

    def accepted(p):
        return abs(p_hat - p) <= Z95 * math.sqrt(p * (1 - p) / n)

    inside, outside = p_hat, (1.0 if upper else 0.0)
    if accepted(outside):
        return outside
    for _ in range(200):
        middle = (inside + outside) / 2
        inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
    return inside


@pytest.mark.parametrize("k, n", [(39, 100), (53, 100), (0, 100), (100, 100), (1, 7), (9990, 10000), (5, 10)])
def test_wilson_interval_is_the_set_the_score_test_accepts(k, n):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(_score_test_bound(k, n, upper=False), abs=1e-12)
    assert high == pytest.approx(_score_test_bound(k, n, upper=True), abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_narrows_with_n_and_other_levels():
    assert wilson_interval(3900, 10000)[1] - wilson_interval(3900, 10000)[0] < 0.02
    narrow, wide = wilson_interval(39, 100, 0.90), wilson_interval(39, 100, 0.99)
    assert wide[0] < 0.300 < narrow[0] and narrow[1] < 0.488 < wide[1]


@pytest.mark.parametrize("k, n, confidence", [(1, 0, 0.95), (-1, 10, 0.95), (11, 10, 0.95), (5, 10, 1.0)])
def test_wilson_interval_refuses_nonsense(k, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(k, n, confidence)


def _pairs(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def test_mcnemar_midp_known_values():
    # d = 6 discordant, all one way: exact p = 2 / 64, mid-p = 1 / 64.
    assert mcnemar_midp(*_pairs(0, 6, both=40, neither=54)) == 1 / 64
    # 1 vs 9: exact p = 2 (1 + 10) / 1024, mid-p = (2 * 1 + 10) / 1024.
    assert mcnemar_midp(*_pairs(1, 9, both=30)) == 12 / 1024
    assert mcnemar_midp(*_pairs(4, 4, both=10)) == 1.0  # an even split
    assert mcnemar_midp(*_pairs(0, 0, both=5, neither=5)) == 1.0  # no discordant points
    assert mcnemar_midp(*_pairs(3, 7)) == mcnemar_midp(*_pairs(7, 3))  # two-sided


def _midp_by_enumeration(only_a: int, only_b: int) -> float:
    """The mid-p value from its definition: twice the one-sided mid-p (the tail beyond the
    smaller count plus half the observed outcome's probability), over all 2^d equally likely
    assignments of the discordant points, capped at 1."""
    d, k = only_a + only_b, min(only_a, only_b)
    below = same = 0
    for outcome in itertools.product((0, 1), repeat=d):
        below += sum(outcome) < k
        same += sum(outcome) == k
    return min(1.0, 2 * (below + same / 2) / 2**d)


@pytest.mark.parametrize("only_a, only_b", [(0, 1), (2, 3), (1, 9), (0, 12), (5, 9), (7, 7), (3, 11)])
def test_mcnemar_midp_matches_its_definition(only_a, only_b):
    assert mcnemar_midp(*_pairs(only_a, only_b, both=3, neither=2)) == pytest.approx(
        _midp_by_enumeration(only_a, only_b), abs=1e-15
    )


def test_mcnemar_midp_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_midp([True, False], [True])
