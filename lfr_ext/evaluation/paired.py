r"""Whether two models' accuracies on the same test points differ by more than chance.

Every model of a comparison is attacked on the same first n test images, so their per-sample
correctness is paired: only the points where exactly one of the two is correct carry evidence
about which is better. McNemar's test (McNemar 1947, Psychometrika 12) asks whether those
discordant points split evenly. With ``b`` points where only A is correct, ``c`` where only B is,
d = b + c and k = min(b, c), under "equal accuracy" b ~ Binomial(d, 1/2), and the two-sided
mid-p value (Lancaster 1961; recommended for McNemar's test by Fagerland, Lydersen & Laake 2013,
BMC Medical Research Methodology 13:91) is

.. math::

    p_\text{mid} = 2 \Pr[X < k] + \Pr[X = k],\qquad X \sim \mathrm{Binomial}(d, 1/2),

the exact test's p value less the probability of the observed split (the exact test is
conservative: its real level is below the nominal one). p = 1 when d = 0 or b = c.

A paired test is more sensitive than comparing the two accuracies' intervals, since the points
both models get right (or both wrong) add no noise to the difference. Evaluations saved without
per-sample correctness per attack (``correct`` in evaluation.json; older files hold only the
worst case's, ``robust``) fall back to that cruder rule: overlapping 95% Wilson intervals
(:mod:`.intervals`) count as not resolved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from .intervals import wilson_interval

WORST_CASE = "worst case"  # the column of the per-sample worst case, beside the attacks'


def mcnemar_midp(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided McNemar mid-p value of "A and B are equally accurate", from their per-sample
    correctness on the same points (see the module's docstring for the formula)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    d, k = only_a + only_b, min(only_a, only_b)
    below = sum(math.comb(d, i) for i in range(k))  # exact integers: no rounding until the division
    return min(1.0, (2 * below + math.comb(d, k)) / 2**d)


class Column(NamedTuple):
    """One accuracy of an evaluation as a count: ``k`` of ``n`` points correct, and which ones
    (``per_sample``, None where the evaluation did not save them)."""

    k: int
    n: int
    per_sample: list[bool] | None


def accuracy_columns(result: dict) -> dict[str, Column]:
    """Each attack's accuracy and the per-sample worst case's (key :data:`WORST_CASE`) of one
    evaluation (a dict shaped as evaluation.json) as counts over its ``n`` attacked points."""
    robust = result.get("robust")
    n = result.get("n") or len(robust)
    masks = result.get("correct") or {}
    columns = {}
    for name, accuracy in result["accuracy"].items():
        mask = masks.get(name)
        columns[name] = Column(sum(mask), n, mask) if mask is not None else Column(round(accuracy * n), n, None)
    columns[WORST_CASE] = (
        Column(sum(robust), n, robust) if robust is not None else Column(round(result["worst_case"] * n), n, None)
    )
    return columns


def _same_points(a: dict, b: dict) -> bool:
    """Both evaluations attacked the same test points (the first n of one dataset, one radius)."""
    return all(a.get(key) == b.get(key) for key in ("data", "eps", "n"))


def resolved(a: Column, b: Column, *, paired: bool, confidence: float = 0.95) -> bool:
    """Whether the difference between two accuracies is significant at ``1 - confidence``:
    McNemar's mid-p test when ``paired`` (same points, per-sample correctness of both), else
    disjoint Wilson intervals."""
    if paired:
        return mcnemar_midp(a.per_sample, b.per_sample) < 1 - confidence
    low_a, high_a = wilson_interval(a.k, a.n, confidence)
    low_b, high_b = wilson_interval(b.k, b.n, confidence)
    return high_a < low_b or high_b < low_a


def unresolved_pairs(
    results: list[dict], names: list[str], confidence: float = 0.95
) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """The pairs of evaluations (named by ``names``) whose accuracies differ by less than the
    sample size resolves, each with the columns where they do, in column order; and the columns
    where some pair was judged by its intervals for want of paired per-sample results."""
    columns = [accuracy_columns(result) for result in results]
    order = []
    for cols in columns:
        order += [name for name in cols if name not in order]
    order = [name for name in order if name != WORST_CASE] + [WORST_CASE]
    pairs, unpaired = [], []
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            same = _same_points(results[i], results[j])
            ties = []
            for name in order:
                a, b = columns[i].get(name), columns[j].get(name)
                if a is None or b is None:
                    continue
                paired = same and a.per_sample is not None and b.per_sample is not None
                if not paired and name not in unpaired:
                    unpaired.append(name)
                if not resolved(a, b, paired=paired, confidence=confidence):
                    ties.append(name)
            if ties:
                pairs.append((names[i], names[j], ties))
    return pairs, [name for name in order if name in unpaired]


__all__ = ["WORST_CASE", "Column", "accuracy_columns", "mcnemar_midp", "resolved", "unresolved_pairs"]
