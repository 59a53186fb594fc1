r"""The ``lfr_ext`` ops, declared once: each op's name, reference, arguments, fake (meta) kernel and autograd.

Every op ``<name>`` of :data:`OPS` exists twice, with one schema:

* ``lfr_ext::<name>``: the compiled library's C++ kernels (schema in ``csrc/lfr_ext.cpp``,
  ``csrc/cpu/<name>_cpu.cpp``, ``csrc/cuda/<name>_cuda.cu``);
* ``lfr_ext::<name>_triton``: the launcher ``<name>_triton`` of ``kernels/<name>.py``, which
  also declares its kernels' ahead-of-time variants (``AOT``, see ``kernels/aot.py``).

and a third time as the eager chain of PyTorch ops it fuses, its ``reference`` function in
:mod:`lfr_ext.reference`.

Everything else is derived from this table: :mod:`lfr_ext.ops` registers the fakes and autograd
of the compiled ops and sends each call to the reference, the compiled op or the Triton twin;
``kernels/registration.py`` registers the Triton twins (with the same fake and autograd),
``scripts/check_cuda_build.sh`` checks that a CUDA build holds a CPU and a CUDA kernel for each
op, and ``tests/triton_aot_check.py`` compiles each op's declared Triton variants.

This module imports only torch and :mod:`lfr_ext.reference` (itself plain PyTorch), because
``kernels/registration.py`` reads it while :mod:`lfr_ext.ops` is still being imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .reference import ascent_step_reference, grad_norm_reference

# --------------------------------------------------------------------------------------
# the norm order argument
# --------------------------------------------------------------------------------------
# The ops take the norm order q as an `int` code: q itself for 1 and 2, Q_INF for inf. The C++
# kernels spell it kQInf (csrc/op_args.h); everything in Python imports it from here.
Q_INF = -1
Q_CODES = (1, 2, Q_INF)


def q_code(q: float) -> int:
    """Integer code of the norm order the ops take (their ``int q`` argument): 1, 2, or
    :data:`Q_INF` for inf. Other orders pass through, for the ops to refuse."""
    return Q_INF if math.isinf(q) else int(q)


@dataclass(frozen=True)
class OpSpec:
    """One op.

    ``reference`` is the eager PyTorch function the kernels must match; its arguments are the
    op's, in the schema's order, with the norm order ``q`` as a number (1, 2, ``math.inf``), and
    its first argument is the tensor whose device and dtype choose the implementation.
    ``op_args`` turns those arguments into the schema's (``float`` scalars, :func:`q_code`).
    ``fake`` computes the outputs' metadata (shapes, dtypes, devices) from the schema's
    arguments for FakeTensor tracing; ``backward`` and ``setup_context`` are its
    :func:`torch.library.register_autograd` formula, ``None`` for an op without autograd."""

    name: str
    reference: Callable
    op_args: Callable[..., tuple]
    fake: Callable
    backward: Callable | None = None
    setup_context: Callable | None = None

    @property
    def compiled(self) -> str:
        """The C++/CUDA op, ``lfr_ext::<name>``."""
        return f"lfr_ext::{self.name}"

    @property
    def triton(self) -> str:
        """Its Triton twin, ``lfr_ext::<name>_triton``."""
        return f"lfr_ext::{self.name}_triton"

    def op(self, impl: str):
        """The registered op that ``impl`` runs: ``torch.ops.lfr_ext.<name>`` (the compiled library,
        whose dispatcher picks the CPU or the CUDA kernel) or, for ``"triton"``, its Triton twin."""
        return getattr(torch.ops.lfr_ext, f"{self.name}_triton" if impl == "triton" else self.name)

    def register(self, op, *, fake: bool = True) -> None:
        """Register the fake kernel (unless ``fake=False``: a ``triton_op`` traces its own body)
        and the autograd formula on ``op``, a qualified name or a ``custom_op``."""
        if fake:
            torch.library.register_fake(op, self.fake)
        if self.backward is not None:
            torch.library.register_autograd(op, self.backward, setup_context=self.setup_context)


# --------------------------------------------------------------------------------------
# ascent_step
# --------------------------------------------------------------------------------------
def _ascent_step_op_args(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g) -> tuple:
    return x, x_adv, h, g, float(eps), float(step_size), float(lo), float(hi), q_code(q), bool(return_sign_g)


def _ascent_step_fake(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g):
    """``(x_new (B, ...), g_norm (B,), sign_g (B, ...) or (0,))``, dense, in x's dtype and device:
    the kernels write contiguous outputs whatever the inputs' strides."""
    torch._check(x.dim() >= 1, lambda: "ascent_step: x needs a batch dimension")
    torch._check(x.shape == x_adv.shape == h.shape == g.shape, lambda: "ascent_step: shapes differ")
    torch._check(x.dtype == x_adv.dtype == h.dtype == g.dtype, lambda: "ascent_step: dtypes differ")
    sign_g = x.new_empty(x.shape) if return_sign_g else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(x.shape[0]), sign_g


# --------------------------------------------------------------------------------------
# grad_norm
# --------------------------------------------------------------------------------------
def _grad_norm_op_args(g, q) -> tuple:
    return g, q_code(q)


def _grad_norm_fake(g, q):
    """``(B,)`` norms in g's dtype and device."""
    torch._check(g.dim() >= 1, lambda: "grad_norm: g needs a batch dimension")
    return g.new_empty(g.shape[0])


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
# the table
# --------------------------------------------------------------------------------------
# The fused LFR update; no autograd (callers that need d x_new / d x use the reference).
ASCENT_STEP = OpSpec("ascent_step", ascent_step_reference, _ascent_step_op_args, _ascent_step_fake)
# One formula for the C++ and the Triton op, itself differentiable (LFR's double backward).
GRAD_NORM = OpSpec(
    "grad_norm",
    grad_norm_reference,
    _grad_norm_op_args,
    _grad_norm_fake,
    _grad_norm_autograd_backward,
    _grad_norm_setup_context,
)
OPS: tuple[OpSpec, ...] = (ASCENT_STEP, GRAD_NORM)
