r"""``hvp="compiled"``: the authors' double backprop, each inner step and the penalty step compiled
whole with ``torch.compile``.

Compiling the model and then differentiating twice is not supported by PyTorch ("torch.compile
with aot_autograd does not currently support double backward"). What works is compiling a whole
function that *contains* the autograd calls, with ``torch._dynamo.config.trace_autograd_ops =
True``, so that Dynamo traces ``torch.autograd.grad`` into the graph:

* the **inner step** ``x' -> (g, h)`` (:func:`lfr_ext.reference.grad_and_hvp_double_backprop`);
* the **penalty step** ``x' -> (mean_i ||g_i||_q, d/dtheta of it)``: the compiled function
  returns the value and the parameter gradients, detached (a compiled region may not return a
  tensor derived from an input it called ``requires_grad_()`` on), and an autograd Function hands
  the gradients to the caller's ``backward()``. So the penalty is exact to first order in the
  weights, which is what training uses, and it is only available reduced over the batch
  (``reduction="mean"`` / ``"sum"``).

Both run with ``torch._inductor.config.fallback_random = True``: Dropout draws exactly what the
eager engines draw, so ``hvp="compiled"`` is interchangeable with them (tests compare in fp64).
Each (model, loss, q) is compiled once, and kept in :data:`lfr_ext.hvp.CACHE` (Dynamo recompiles
by itself when module modes or shapes change). Where the running torch cannot trace autograd
calls, or compilation fails, the engine is unavailable and ``hvp="compiled"`` raises with the
reason (:func:`compile_support_problem`).
The linearized engine is not compiled: its tape is a ``TorchFunctionMode`` with Python state
that Dynamo does not trace.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
from torch import nn

from .._rng import RngState, preserved_rng
from ..reference import LossFn, grad_and_hvp_double_backprop, grad_norm_reference, penalty_at
from .cache import CACHE
from .facts import MethodFacts

FACTS = MethodFacts(
    name="compiled",
    description="double backprop, each step compiled whole by ``torch.compile``",
    exact=True,
    auto_may_choose=False,
    takes_grad_scaler=False,
    per_sample_penalty=False,
    penalty_differentiable_in_x=False,
)


def compile_backend() -> str:
    """``torch.compile``'s backend for these functions: ``$LFR_EXT_COMPILE_BACKEND`` or inductor
    (``aot_eager`` compiles in seconds and runs the traced graph eagerly: a debugging aid)."""
    return os.environ.get("LFR_EXT_COMPILE_BACKEND", "inductor")


def compile_support_problem() -> str | None:
    """Why whole-step compilation cannot run with this torch, or None: the config switch must
    exist, and a tiny model's inner and penalty steps must compile (Dynamo's ``eager`` backend,
    once per process, the answer kept in :data:`lfr_ext.hvp.CACHE`: what would fail in Dynamo on a
    real model fails here, with a reason)."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return (
            "this torch cannot trace autograd.grad into a compiled graph (torch._dynamo.config.trace_autograd_ops "
            "is missing); use hvp='auto'"
        )
    if CACHE.compile_trial is None:
        CACHE.compile_trial = (_trial_compile_problem(),)
    return CACHE.compile_trial[0]


def _trial_compile_problem() -> str | None:
    from ..reference import default_loss

    # The trial runs inside the caller's first hvp='compiled' call: it must not draw from the
    # global RNG, or that call's start noise would differ from an eager engine's.
    with preserved_rng(RngState.capture()):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        x, y = torch.rand(2, 3), torch.tensor([0, 1])
        try:
            engine = CompiledSecondOrder(model, default_loss, 1, "eager")
            engine.grad_and_hvp(x, y)
            engine.penalty(x, y).sum().backward()
        except Exception as error:  # noqa: BLE001  (whatever Dynamo raises, the answer is: not here)
            return f"compiling a step with its autograd calls fails with this torch ({type(error).__name__}: {error})"
    return None


@contextlib.contextmanager
def _tracing_autograd():
    """The settings every compile (and recompile) of these functions needs."""
    import torch._inductor.config

    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        yield


class _PenaltyWithGradients(torch.autograd.Function):
    """``values`` (B,) whose backward is ``mean(grad_out) * grads``: exact when ``grad_out`` is
    the same for every sample, as the batch mean and sum make it."""

    @staticmethod
    def forward(ctx, values, grads, *params):
        ctx.save_for_backward(*grads)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out.mean()
        return (None, None, *(scale * g for g in ctx.saved_tensors))


def _differentiable_leaf(x_adv: torch.Tensor) -> torch.Tensor:
    """``x_adv`` as a fresh leaf that requires grad, made outside the compiled functions: Dynamo
    in torch 2.11 does not trace ``requires_grad_()`` on a tensor inside a fullgraph region."""
    return x_adv.detach().requires_grad_(True)


class CompiledSecondOrder:
    """The compiled inner step and penalty step of one model, loss and norm.

    The model is held weakly (the engine is cached per model) and its trainable parameters are
    read at every call and passed in: a caller may swap them (``GraphedStep`` captures on fresh
    leaves), and the penalty's gradients must reach the parameters the forward used.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, q: float, backend: str):
        self._model = weakref.ref(model)

        # The per-sample norms are PyTorch's own ops here (Inductor fuses them with the rest).
        def inner(model, x_adv, y):
            return grad_and_hvp_double_backprop(model, x_adv, y, loss_fn, q, norm_fn=grad_norm_reference)

        def penalty(model, params, x_adv, y):
            values = penalty_at(model, x_adv, y, q=q, loss_fn=loss_fn, norm_fn=grad_norm_reference)
            grads = torch.autograd.grad(values.sum(), params, allow_unused=True, materialize_grads=True)
            return values.detach(), [g.detach() for g in grads]

        # Static shapes: a new batch shape compiles anew. Both closures share one code object for
        # every engine, so with automatic dynamic shapes a second model or batch shape would be
        # traced with symbolic sizes, and torch 2.11's convolution double backward calls numel()
        # on them and fails.
        self._inner = torch.compile(inner, backend=backend, fullgraph=True, dynamic=False)
        self._penalty = torch.compile(penalty, backend=backend, fullgraph=True, dynamic=False)

    def grad_and_hvp(self, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _tracing_autograd():
            return self._inner(self._model(), _differentiable_leaf(x_adv), y)

    def penalty(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample penalties (B,) for a caller that reduces them by mean or sum."""
        model = self._model()
        params = [p for p in model.parameters() if p.requires_grad]
        with _tracing_autograd():
            values, grads = self._penalty(model, params, _differentiable_leaf(x_adv), y)
        return _PenaltyWithGradients.apply(values, grads, *params)


def engine_for(model: nn.Module, loss_fn: LossFn, q: float, backend: str | None = None) -> CompiledSecondOrder:
    """The (cached) compiled engine of ``model`` for this loss, norm and backend."""
    backend = backend or compile_backend()
    problem = compile_support_problem()
    if problem is not None:
        raise RuntimeError(f"hvp='compiled' is not available: {problem}")
    per_model = CACHE.compiled.setdefault(model, {})
    key = (loss_fn, q, backend)
    if key not in per_model:
        per_model[key] = CompiledSecondOrder(model, loss_fn, q, backend)
    return per_model[key]
