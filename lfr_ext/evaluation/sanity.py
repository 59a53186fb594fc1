"""Gradient-masking sanity checks (Athalye et al. 2018; Carlini et al. 2019, "On evaluating
adversarial robustness"): symptoms that the white-box attacks were fooled, not the defense.

Each check returns a :class:`Check`; a failed one is a *flag* in the report: the robust
accuracy of that model should not be trusted until the cause is understood.
"""

from __future__ import annotations

from typing import NamedTuple


class Check(NamedTuple):
    name: str
    passed: bool
    detail: str


def stronger_attacks_not_weaker(accuracies: dict[str, float], order: list[str], tolerance: float) -> Check:
    """Along ``order`` (clean, FGSM, PGD, AutoAttack: each at least as strong as the one before
    on the same points), accuracy must not rise by more than ``tolerance``."""
    present = [name for name in order if name in accuracies]
    rises = [
        f"{a} {accuracies[a]:.4f} < {b} {accuracies[b]:.4f}"
        for a, b in zip(present, present[1:])
        if accuracies[b] > accuracies[a] + tolerance
    ]
    detail = "; ".join(rises) if rises else " >= ".join(f"{n} {accuracies[n]:.4f}" for n in present)
    return Check("stronger attacks give lower accuracy", not rises, detail)


def black_box_not_better(accuracies: dict[str, float], black_box: str, white_box: list[str], tolerance: float) -> Check:
    """A black-box attack (Square) must not beat the best white-box attack: if it does, the
    gradients the white-box attacks follow are uninformative (masked)."""
    if black_box not in accuracies:
        return Check("black-box does not beat white-box", True, "no black-box attack run")
    best_white = min((accuracies[n], n) for n in white_box if n in accuracies)
    passed = accuracies[black_box] >= best_white[0] - tolerance
    relation = ">=" if passed else "<"
    return Check(
        "black-box does not beat white-box",
        passed,
        f"{black_box} {accuracies[black_box]:.4f} {relation} {best_white[1]} {best_white[0]:.4f}",
    )


def accuracy_reaches_zero(
    eps_grid: list[float], accuracies: list[float], *, max_final: float, tolerance: float
) -> Check:
    """Accuracy must fall (within ``tolerance``) as eps grows and be at most ``max_final`` at
    the largest radius: an unbounded attacker always wins unless gradients are masked."""
    rises = [
        f"eps {e1:g}: {a1:.3f} -> eps {e2:g}: {a2:.3f}"
        for e1, a1, e2, a2 in zip(eps_grid, accuracies, eps_grid[1:], accuracies[1:])
        if a2 > a1 + tolerance
    ]
    final_ok = accuracies[-1] <= max_final
    problems = rises + ([] if final_ok else [f"accuracy {accuracies[-1]:.3f} > {max_final} at eps {eps_grid[-1]:g}"])
    detail = "; ".join(problems) if problems else f"monotone, {accuracies[-1]:.3f} at eps {eps_grid[-1]:g}"
    return Check("accuracy falls to 0 as eps grows", not problems, detail)


def sampling_tolerance(n: int) -> float:
    """Slack for comparing two accuracies on the same ``n`` points: two samples or 0.5%, the
    larger (different attacks break slightly different points by chance)."""
    return max(2.0 / max(n, 1), 0.005)
