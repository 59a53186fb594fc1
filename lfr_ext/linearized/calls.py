"""What every rule of the linearized tangent pass shares: its refusal and its argument reading."""

from __future__ import annotations

import functools
import inspect


class UnsupportedOpError(NotImplementedError):
    """An op that depends on the input has no exact linearized rule here (``op`` names it)."""

    def __init__(self, op: str):
        self.op = op
        super().__init__(
            f"the linearized tangent pass does not support `{op}` (the ops it makes exact are listed in "
            "lfr_ext.linearized.SUPPORTED_OPS; hvp='double_backprop' covers any model)"
        )


class DeclinedOpError(UnsupportedOpError):
    """An op the tape covers, refused because its class was declined (``op_class``, ``reason``)."""

    def __init__(self, op: str, op_class: str, reason: str):
        self.op_class, self.reason = op_class, reason
        super().__init__(op)
        self.args = (f"`{op}` is {op_class}, which hvp='auto' leaves to double backprop ({reason})",)


# A memo of pure facts (a function's signature), valid for the whole process: nothing to forget.
@functools.lru_cache(maxsize=None)
def _parameters(func) -> tuple[tuple[str, object], ...]:
    return tuple((name, p.default) for name, p in inspect.signature(func).parameters.items())


def arguments(func, args, kwargs) -> dict:
    """All arguments of a call of the Python function ``func`` by name, defaults filled in. Runs
    once per recorded op, so it is a plain loop over a cached parameter list
    (``inspect.Signature.bind`` costs ~10x more)."""
    parameters = _parameters(func)
    named = dict(zip((name for name, _ in parameters), args))
    for name, default in parameters[len(args) :]:
        named[name] = kwargs.get(name, default)
    return named
