r"""The ``lfr_ext::*`` operators: Python entry points, fake kernels, autograd, implementation choice.

Ops (schemas in ``csrc/lfr_ext.cpp``; Triton twins with a ``_triton`` suffix in ``kernels/ops.py``):

* ``ascent_step(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g) -> (x_new, g_norm, sign_g)``
  the fused LFR update; no autograd (callers that need ``d x_new / d x`` use the reference).
* ``grad_norm(g, q) -> (B,)`` per-sample ``||g_b||_q`` with autograd that is itself
  differentiable (double backward), as LFR's penalty needs.

Each runs as ``reference`` / ``cpu`` / ``cuda`` / ``triton``, chosen per call by ``impl``
(see :mod:`lfr_ext._registry`; ``impl=None`` reads ``LFR_EXT_IMPL``, then ``auto``).
"""

from __future__ import annotations

import math

import torch

from . import _extension, _registry
from ._registry import IMPLS, available_impls, resolve_impl  # noqa: F401  (public API of this module)
from .reference import ascent_step_reference, grad_norm_reference

_unavailable_reason = _registry.unavailable_reason  # kept for callers of the foundation API


def q_code(q: float) -> int:
    """Integer code of the norm order the compiled ops take (their ``int q`` argument): 1, 2, or
    -1 for inf (``kQInf`` in ``csrc/cpu/per_sample_norm.h``)."""
    return -1 if math.isinf(q) else int(q)


# --------------------------------------------------------------------------------------
# grad_norm autograd: one formula for the C++ and the Triton op
# --------------------------------------------------------------------------------------
def grad_norm_backward(g: torch.Tensor, norm: torch.Tensor, grad_out: torch.Tensor, q: int) -> torch.Tensor:
    r"""``d L / d g`` given ``grad_out = d L / d norm``; g (B, ...), norm and grad_out (B,).

    The subgradients are PyTorch's for :func:`lfr_ext.reference.grad_norm_reference`:

    * q=1:   ``grad_out_b * sign(g)`` (0 where g = 0);
    * q=2:   ``g * grad_out_b / ||g_b||`` and 0 for a sample with ``||g_b|| = 0``;
    * q=inf: ``sign(g) * [|g| = ||g_b||_inf] * grad_out_b / count_b``: shared evenly by the
      ``count_b`` entries attaining the max (0 for an all-zero sample, since sign(0) = 0).

    Built from differentiable PyTorch ops, with ``norm`` the op's own output, so the result
    can be differentiated again (``create_graph=True``): for q=2 the second derivative flows
    through ``g`` and through ``norm`` (back into the op); for q=1 and inf it is 0 a.e.
    """
    per_sample = (g.shape[0],) + (1,) * (g.dim() - 1)
    if q == 1:
        return grad_out.reshape(per_sample) * torch.sign(g)
    if q == 2:
        is_zero = norm == 0
        # where() on both sides: a plain grad_out / norm would put inf/NaN into the double backward.
        scale = torch.where(is_zero, torch.zeros_like(grad_out), grad_out / torch.where(is_zero, 1, norm))
        return g * scale.reshape(per_sample)
    attains_max = g.abs() == norm.reshape(per_sample)
    dims = tuple(range(1, g.dim()))
    count = attains_max.sum(dim=dims, keepdim=True) if dims else attains_max.to(torch.int64)
    return (grad_out.reshape(per_sample) / count) * attains_max * torch.sign(g)


def _grad_norm_setup_context(ctx, inputs, output):
    g, q = inputs
    ctx.q = q
    ctx.save_for_backward(g if ctx.needs_input_grad[0] else None, output)


def _grad_norm_autograd_backward(ctx, grad_out):
    g, norm = ctx.saved_tensors
    if g is None:
        return None, None
    return grad_norm_backward(g, norm, grad_out, ctx.q), None


# --------------------------------------------------------------------------------------
# registrations for the compiled (C++/CUDA) ops
# --------------------------------------------------------------------------------------
def _register_compiled_ops() -> None:
    """Fake (meta) kernels and autograd for the C++-defined ops, so torch.compile traces them."""

    @torch.library.register_fake("lfr_ext::ascent_step")
    def _(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g):
        torch._check(x.dim() >= 1, lambda: "ascent_step: x needs a batch dimension")
        torch._check(x.shape == x_adv.shape == h.shape == g.shape, lambda: "ascent_step: shapes differ")
        torch._check(x.dtype == x_adv.dtype == h.dtype == g.dtype, lambda: "ascent_step: dtypes differ")
        x_new = x.new_empty(x.shape)
        sign_g = x.new_empty(x.shape) if return_sign_g else x.new_empty(0)
        return x_new, x.new_empty(x.shape[0]), sign_g

    @torch.library.register_fake("lfr_ext::grad_norm")
    def _(g, q):
        torch._check(g.dim() >= 1, lambda: "grad_norm: g needs a batch dimension")
        return g.new_empty(g.shape[0])

    torch.library.register_autograd(
        "lfr_ext::grad_norm", _grad_norm_autograd_backward, setup_context=_grad_norm_setup_context
    )


def _register_triton_autograd(kernels) -> None:
    kernels.grad_norm_op.register_autograd(_grad_norm_autograd_backward, setup_context=_grad_norm_setup_context)


if _extension.is_loaded():
    _register_compiled_ops()
if not isinstance(_registry.triton_kernels(), str):
    _register_triton_autograd(_registry.triton_kernels())


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------
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
    chosen = resolve_impl(impl, x.device, x.dtype)
    if chosen == "reference":
        return ascent_step_reference(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g)
    op = torch.ops.lfr_ext.ascent_step_triton if chosen == "triton" else torch.ops.lfr_ext.ascent_step
    return op(x, x_adv, h, g, float(eps), float(step_size), float(lo), float(hi), q_code(q), bool(return_sign_g))


def grad_norm(g: torch.Tensor, q: float = 1, *, impl: str | None = None) -> torch.Tensor:
    r"""Per-sample norm ``n_b = ||g_b||_q`` of g (B, ...) -> (B,), in g's dtype.

    q is 1, 2 or ``math.inf``; accumulation in fp32 (fp64 for fp64 on reference/cpu/cuda).
    Differentiable twice, with the subgradient conventions of
    :func:`lfr_ext.reference.grad_norm_reference` (see :func:`grad_norm_backward`).
    ``impl`` as in :func:`ascent_step`.
    """
    chosen = resolve_impl(impl, g.device, g.dtype)
    if chosen == "reference":
        return grad_norm_reference(g, q)
    op = torch.ops.lfr_ext.grad_norm_triton if chosen == "triton" else torch.ops.lfr_ext.grad_norm
    return op(g, q_code(q))
