"""Warnings given once per key: one definition for the engines' process-wide ones
(:data:`lfr_ext.hvp.CACHE`) and each GraphedStep's own."""

from __future__ import annotations

import warnings
from typing import Hashable


class WarnOnce:
    """``warn(key, message, stacklevel)`` issues a ``RuntimeWarning`` the first time ``key`` is
    seen, and nothing after; ``stacklevel`` counts from the caller, as for ``warnings.warn``."""

    def __init__(self):
        self.given: set[Hashable] = set()

    def warn(self, key: Hashable, message: str, stacklevel: int = 2) -> None:
        if key in self.given:
            return
        self.given.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
