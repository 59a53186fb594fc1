r"""The ``lfr_ext::*`` operators: Python entry points, fake kernels, autograd, implementation choice.

Ops (declared once, with their fake kernels and autograd, in :data:`OPS`; schemas in
``csrc/lfr_ext.cpp``; Triton twins with a ``_triton`` suffix in ``kernels/registration.py``):

* ``ascent_step(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g) -> (x_new, g_norm, sign_g)``
  the fused LFR update; no autograd (callers that need ``d x_new / d x`` use the reference).
* ``grad_norm(g, q) -> (B,)`` per-sample ``||g_b||_q`` with autograd that is itself
  differentiable (double backward), as LFR's penalty needs.

Each runs as ``reference`` / ``cpu`` / ``cuda`` / ``triton``, chosen per call by ``impl``
(see :mod:`lfr_ext._impl`; ``impl=None`` reads ``LFR_EXT_IMPL``, then ``auto``).
"""

from __future__ import annotations

import torch

from . import _extension, _impl
from ._impl import IMPLS, available_impls, resolve_impl  # noqa: F401  (public API of this module)
from ._op_specs import ASCENT_STEP, GRAD_NORM, OPS, OpSpec, grad_norm_backward, q_code  # noqa: F401  (public API)


# --------------------------------------------------------------------------------------
# registrations, from the op table
# --------------------------------------------------------------------------------------
def _register_compiled_ops() -> None:
    """Fake (meta) kernels and autograd for the C++-defined ops, so torch.compile traces them."""
    for spec in OPS:
        spec.register(spec.compiled)


if _extension.is_loaded():
    _register_compiled_ops()
# The Triton twins register themselves, with the same fakes and autograd, when kernels/registration.py is
# imported; importing it here (where Triton can run) makes torch.ops.lfr_ext.<name>_triton exist
# after `import lfr_ext`, as the compiled ops do.
_impl.triton_kernels()


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------
def _dispatch(spec: OpSpec, impl: str | None, *args):
    """Run the op ``spec`` on ``args`` (the reference's arguments) as ``impl`` chooses for the
    device and dtype of ``args[0]``: the reference function, or the registered op (compiled or
    Triton) on the arguments converted to its schema."""
    lead = args[0]
    chosen = resolve_impl(impl, lead.device, lead.dtype)
    if chosen == "reference":
        return spec.reference(*args)
    return spec.op(chosen)(*spec.op_args(*args))


def ascent_step(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    lo: float = 0.0,
    hi: float = 1.0,
    q: float = 1,
    return_sign_g: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Fused LFR ascent update and per-sample gradient norm, in one pass over memory.

    .. math::
       x_{new} = \mathrm{clip}_{[lo,hi]}\big(\mathrm{proj}_{\|x_{new}-x\|_\infty\le\epsilon}
       (x' + \alpha\,\mathrm{sign}(h))\big),\qquad n_b = \|g_b\|_q,\qquad s = \mathrm{sign}(g)

    Args:
        x: (B, ...) clean inputs, the centre of the eps-ball.
        x_adv: (B, ...) current point ``x'``; h: (B, ...) ascent direction (only its sign is
            used); g: (B, ...) input gradient whose norm is reported. One shape and dtype.
        eps, step_size: ball radius and step ``alpha``; lo, hi: the box; q: 1, 2 or ``math.inf``.
        return_sign_g: also return ``sign(g)`` (else an empty tensor).
        impl: "auto" | "triton" | "cuda" | "cpu" | "reference" (None: ``$LFR_EXT_IMPL`` or auto).
    Returns:
        ``(x_new (B, ...), g_norm (B,), sign_g (B, ...) or (0,))`` in the inputs' dtype;
        ``sign(0) = sign(NaN) = 0`` as ``torch.sign``. The update rounds exactly as the eager
        chain on the same device; norms accumulate in fp32 (fp64 for fp64).
    """
    return _dispatch(ASCENT_STEP, impl, x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g)


def grad_norm(g: torch.Tensor, q: float = 1, *, impl: str | None = None) -> torch.Tensor:
    r"""Per-sample norm ``n_b = ||g_b||_q`` of g (B, ...) -> (B,), in g's dtype.

    q is 1, 2 or ``math.inf``; accumulation in fp32 (fp64 for fp64 on reference/cpu/cuda).
    Differentiable twice, with the subgradient conventions of
    :func:`lfr_ext.reference.grad_norm_reference` (see :func:`grad_norm_backward`).
    ``impl`` as in :func:`ascent_step`.
    """
    return _dispatch(GRAD_NORM, impl, g, q)
