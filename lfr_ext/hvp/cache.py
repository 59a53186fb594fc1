"""The one explicit process-wide memory of the second-order engines: :data:`CACHE`."""

from __future__ import annotations

import contextlib
import weakref

from torch import nn

from .._warn_once import WarnOnce


class EngineCache:
    """What the second-order engines learned, for the whole process: the one place they keep it.

    * ``uncovered``: model -> the op its recording refused (``hvp="auto"`` then runs double
      backprop for it without recording again);
    * ``verified``: model -> {(pass, module modes): whether the pass couples samples}, the
      recordings checked against autograd once;
    * ``compiled``: model -> {(loss, q, backend): its compiled steps} (:mod:`lfr_ext.hvp.compiled`);
    * ``compile_trial``: None until whole-step compilation was tried on a tiny model, then a
      1-tuple holding why it fails with this torch, or None when it works;
    * ``warned``: the one-time warnings already given.

    Weak in the models. :data:`CACHE` is the one the engines use: ``CACHE.clear()`` forgets
    everything, ``with CACHE.scoped():`` runs a block with a fresh cache and puts the old one back.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.uncovered: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
        self.verified: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
        self.compiled: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
        self.compile_trial: tuple[str | None] | None = None
        self.warned = WarnOnce()

    @contextlib.contextmanager
    def scoped(self):
        saved = dict(vars(self))
        self.clear()
        try:
            yield self
        finally:
            vars(self).update(saved)

    def warn_once(self, key: tuple, message: str, stacklevel: int = 5) -> None:
        """Warn once per ``key``, at ``stacklevel`` as ``warnings.warn`` called here counts it (5:
        the user's call of a public function, through the engine's layers)."""
        self.warned.warn(key, message, stacklevel=stacklevel)


CACHE = EngineCache()
