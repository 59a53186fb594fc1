r"""The confidence interval of an accuracy measured on n test points.

An accuracy is k correct out of n points: a binomial proportion. Its 95% interval is the Wilson
score interval (Wilson 1927, "Probable inference, the law of succession, and statistical
inference", JASA 22): the set of p whose score test does not reject k/n,

.. math::

    |\hat p - p| \le z \sqrt{p (1 - p) / n},\qquad \hat p = k / n,

whose ends, the roots of that quadratic in p, are

.. math::

    \frac{\hat p + z^2 / 2n \;\pm\; z \sqrt{\hat p (1 - \hat p) / n + z^2 / 4n^2}}{1 + z^2 / n},

with z the standard normal's 1 - (1 - confidence) / 2 quantile (1.95996 for 95%). Unlike the
normal approximation (p̂ ± z sqrt(p̂(1-p̂)/n)) it stays inside [0, 1] and does not collapse to a
point at 0/n or n/n, which robust accuracies near 0 reach (Brown, Cai & DasGupta 2001).
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high): the Wilson score interval of the proportion ``k / n`` (see the module's
    docstring for the formula). 39 of 100 at 95%: (0.300, 0.488)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    # Clamped: at k = 0 or k = n one end is 0 or 1 exactly, up to rounding.
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = ["wilson_interval"]
