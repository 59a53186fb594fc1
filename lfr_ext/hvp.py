r"""How LFR's second-order products are computed: the ``hvp=`` selector.

Every inner ascent step needs the input gradient ``g = grad_x' sum_i l_i`` and the
Hessian-vector product ``h = H v`` with ``v = d sum_i ||g_i||_q / dg`` (``sign(g)`` for q=1);
the penalty needs ``grad_theta mean_i ||g_i||_q``.

==================== ====================================================================
``double_backprop``  the authors' way: ``create_graph=True`` and a gradient of a gradient
                     (exact, any model; ~4.7x a gradient per HVP on GPU)
``linearized``       the exact linearized tangent pass (:mod:`lfr_ext.linearized`): for
                     networks piecewise linear in x and the cross-entropy loss,
                     ``H v = J^T (diag(p) - p p^T) J v``: one tangent pass plus one VJP
                     through the graph the gradient pass kept (~2 gradients per step). The
                     penalty's weight gradient backprops ``sum_i (p_i - e_{y_i})^T (J s)_i``
                     with ``s = d||g||_q/dg`` fixed, which equals ``sum_i ||g_i||_q`` as a
                     function of the weights around the current point: exact, train-mode
                     BatchNorm included. (For q=2, ``s = g/||g||`` moves with the weights, so
                     only first derivatives are exact, which is what training uses; for
                     q=1 and inf, ``s`` is locally constant and all orders are exact.)
``forward``          ``torch.func`` forward-over-reverse for the inner HVPs (exact for
                     smooth and piecewise-linear models; measured slower on GPU); the
                     penalty uses double backprop (never forward AD for the outer gradient:
                     PyTorch's train-mode batch_norm forward-AD rule is wrong there).
``finite_difference``central differences of the gradient along ``v`` (an approximation:
                     O(r^2) inside a linear region, arbitrary across ReLU kinks); the
                     penalty uses double backprop. Never picked by ``auto``.
``auto``             ``linearized`` when the loss is the default cross-entropy and every op
                     of the model is covered, else ``double_backprop`` (with a one-time
                     warning naming the op that is not covered).
==================== ====================================================================
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linearized import TangentTape, UnsupportedOpError
from .reference import LossFn, grad_and_hvp_double_backprop, grad_norm_reference, input_gradient, penalty_at

logger = logging.getLogger("lfr_ext")

HVP_METHODS = ("auto", "linearized", "double_backprop", "forward", "finite_difference")
FINITE_DIFFERENCE_RADIUS = 1e-3

# Models found not covered by the linearized pass: model -> op name (weak: models may die).
_UNCOVERED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# Passes whose recording was cross-checked against autograd: model -> {("inner",), ("penalty", training)}.
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()
_WARNED: set[tuple[str, str]] = set()
# Tolerance of the cross-check: loose enough for TF32/bf16 rounding, far below the O(1)
# disagreement of a branch the tape did not see.
_CROSS_CHECK_RTOL = 2e-2


def norm_subgradient(g: torch.Tensor, q: float) -> torch.Tensor:
    """``d sum_i ||g_i||_q / dg`` (B, ...), with the conventions of
    :func:`lfr_ext.reference.grad_norm_reference` (``sign(g)`` for q=1, ``g/||g||`` and 0 at
    0 for q=2, ``sign`` split evenly among the max entries for q=inf)."""
    if q == 1:
        return torch.sign(g)
    with torch.enable_grad():
        leaf = g.detach().requires_grad_(True)
        (s,) = torch.autograd.grad(grad_norm_reference(leaf, q).sum(), leaf)
    return s


def _cross_entropy_residual(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p - onehot(y)`` (B, C): the gradient of per-sample cross-entropy in the logits."""
    return torch.softmax(logits, dim=-1) - F.one_hot(y.long(), logits.shape[-1]).to(logits.dtype)


def _record(model: nn.Module, x: torch.Tensor) -> tuple[TangentTape, torch.Tensor]:
    with TangentTape(x) as tape:
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise UnsupportedOpError("a model output that is not a (B, C) logits tensor")
    if not tape.carries(logits):
        raise UnsupportedOpError("a model whose output the tape did not see computed (torch.compile'd or custom "
                                 "autograd.Function forward?)")
    return tape, logits


def _cross_check(autograd_side: torch.Tensor, tape_side: torch.Tensor) -> None:
    """``sum_i v_i^T g_i`` (autograd) against ``sum_i (p_i - e_{y_i})^T (J v)_i`` (the tape).

    Both equal ``v^T J^T (p - e)`` in exact arithmetic, for any ``v``. They disagree when part
    of the forward escaped the recording (a custom ``autograd.Function``, ``.data``, a compiled
    region): then the tangent would be silently wrong, so refuse instead. One host sync; skipped
    while a CUDA graph is being captured.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    a, b = autograd_side.item(), tape_side.item()
    scale = max(abs(a), abs(b))
    if abs(a - b) > _CROSS_CHECK_RTOL * scale and scale > 1e-30:
        raise UnsupportedOpError(
            f"a computation the tape did not record (custom autograd.Function, .data, compiled region?): J v "
            f"disagrees with autograd ({b:.6g} vs {a:.6g})"
        )


# ---------------------------------------------------------------------------------------
# Inner step: (g, h)
# ---------------------------------------------------------------------------------------
def grad_and_hvp_linearized(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
                            verify: bool = False):
    """``g`` and ``h = H v`` by the linearized tangent pass; default cross-entropy only.

    One forward (recorded), one backward for ``g`` (graph kept), one tangent pass for
    ``J v`` (no graph), one backward for ``J^T (diag(p) - p p^T) J v``. Both (B, ...), detached.
    ``verify`` cross-checks the tape against autograd (:func:`_cross_check`).
    """
    x_adv = x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_adv)
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), x_adv, retain_graph=True)
    v = norm_subgradient(g, q)
    with torch.no_grad():
        jv = tape.tangent(v, logits)
        p = torch.softmax(logits.detach(), dim=-1)
        w = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)  # (diag(p) - p p^T) J v
        if verify:
            residual = p - F.one_hot(y.long(), p.shape[-1]).to(p.dtype)
            _cross_check((v.double() * g.double()).sum(), (residual.double() * jv.double()).sum())
    (h,) = torch.autograd.grad(logits, x_adv, grad_outputs=w)
    return g, h


def grad_and_hvp_forward(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float):
    """``g`` and ``h`` by ``torch.func``: ``h = jvp(grad(sum l), x', v)`` (forward-over-reverse)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def total_loss(z):
        losses = loss_fn(torch.func.functional_call(model, (params, buffers), (z,)), y)
        return losses.sum()

    x = x_adv.detach()
    g = torch.func.grad(total_loss)(x)
    v = norm_subgradient(g, q)
    _, h = torch.func.jvp(torch.func.grad(total_loss), (x,), (v,))
    return g.detach(), h.detach()


def grad_and_hvp_finite_difference(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float):
    """Approximate ``h = (g(x' + r v) - g(x' - r v)) / 2r``, ``r`` chosen per sample so the
    largest coordinate moves by ``FINITE_DIFFERENCE_RADIUS``. Eval-mode models only (the
    per-sample radii assume samples do not interact)."""

    def grad_at(z):
        return input_gradient(model, z.detach().requires_grad_(True), y, loss_fn, create_graph=False)

    g = grad_at(x_adv)
    v = norm_subgradient(g, q)
    largest = v.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    radius = (FINITE_DIFFERENCE_RADIUS / largest).view(-1, *([1] * (v.dim() - 1)))
    h = (grad_at(x_adv + radius * v) - grad_at(x_adv - radius * v)) / (2 * radius)
    return g, h


# ---------------------------------------------------------------------------------------
# Penalty: per-sample ||g_i||_q with the exact gradient w.r.t. the parameters
# ---------------------------------------------------------------------------------------
def penalty_linearized(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, q: float,
                       verify: bool = False) -> tuple[torch.Tensor, bool]:
    """Per-sample ``||g_i||_q`` (B,) whose derivatives (w.r.t. the parameters, and ``x'``
    if it requires grad) are those of ``sum_i (p_i - e_{y_i})^T (J s)_i``, ``s`` fixed.

    Returns ``(penalty, couples_samples)``. When the model couples samples (train-mode
    BatchNorm) only the *sum* of the returned vector has exact derivatives.
    """
    x_in = x_adv if x_adv.requires_grad else x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_in)
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), x_in, retain_graph=True)
    norms = grad_norm_reference(g, q)  # the value, exactly as double backprop computes it
    s = norm_subgradient(g, q)
    jvp = tape.tangent(s, logits)  # recorded with grad: depends on the weights (and x')
    surrogate = (_cross_entropy_residual(logits, y) * jvp).sum(dim=-1)
    if verify:  # sum_i ||g_i||_q = sum_i s_i^T g_i (Euler: the norm is 1-homogeneous)
        _cross_check(norms.detach().double().sum(), surrogate.detach().double().sum())
    # Value of `norms`, derivatives of `surrogate` (equal functions of the weights locally).
    return norms + (surrogate - surrogate.detach()), tape.couples_samples


# ---------------------------------------------------------------------------------------
# The plan for one call: which engine, with auto's fallback
# ---------------------------------------------------------------------------------------
class HVPPlan:
    """Resolves ``hvp=`` for one call and falls back (``auto``) or raises (``linearized``)
    when the linearized pass does not apply."""

    _INNER: dict[str, Callable] = {
        "double_backprop": grad_and_hvp_double_backprop,
        "linearized": grad_and_hvp_linearized,
        "forward": grad_and_hvp_forward,
        "finite_difference": grad_and_hvp_finite_difference,
    }

    def __init__(self, hvp: str, model: nn.Module, default_loss: bool):
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if hvp == "linearized" and not default_loss:
            raise ValueError(
                "hvp='linearized' needs the default cross-entropy loss (its Hessian in the logits is "
                "diag(p) - p p^T); pass loss_fn=None or use hvp='double_backprop'"
            )
        self.requested = hvp
        self.model = model
        if hvp == "auto":
            uncovered = _UNCOVERED.get(model)
            self.method = "linearized" if default_loss and uncovered is None else "double_backprop"
            reason = "custom loss_fn" if not default_loss else (f"`{uncovered}` not covered" if uncovered else "")
        else:
            self.method, reason = hvp, "requested"
        logger.debug("lfr_ext: hvp=%r -> %s%s", hvp, self.method, f" ({reason})" if reason else "")

    def _fall_back(self, error: UnsupportedOpError) -> None:
        if self.requested != "auto":
            raise error
        _UNCOVERED[self.model] = error.op
        key = (type(self.model).__qualname__, error.op)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"lfr_ext: hvp='auto' falls back to double backprop for {type(self.model).__name__}: {error}",
                RuntimeWarning, stacklevel=4,
            )
        logger.debug("lfr_ext: hvp='auto' -> double_backprop (%s)", error.op)
        self.method = "double_backprop"

    def _needs_check(self, model, key) -> bool:
        return key not in _VERIFIED.get(model, ())

    def _checked(self, model, key) -> None:
        _VERIFIED.setdefault(model, set()).add(key)

    def grad_and_hvp(self, model, x_adv, y, loss_fn, q):
        if self.method == "linearized":
            key = ("inner",)
            try:
                verify = self._needs_check(model, key)
                result = grad_and_hvp_linearized(model, x_adv, y, loss_fn, q, verify=verify)
                if verify:
                    self._checked(model, key)
                return result
            except UnsupportedOpError as error:
                self._fall_back(error)
        return self._INNER[self.method](model, x_adv, y, loss_fn, q)

    def penalty(self, model, x_adv, y, loss_fn, q, reduction: str) -> torch.Tensor:
        """Per-sample penalties (B,) in the model's current mode."""
        if self.method == "linearized":
            key = ("penalty", model.training)
            try:
                verify = self._needs_check(model, key)
                penalty, coupled = penalty_linearized(model, x_adv, y, q, verify=verify)
                if verify:
                    self._checked(model, key)
            except UnsupportedOpError as error:
                self._fall_back(error)
            else:
                if not (coupled and reduction == "none"):
                    return penalty
                if self.requested == "linearized":
                    raise ValueError(
                        "hvp='linearized' with reduction='none' on a model whose penalty pass couples samples "
                        "(train-mode BatchNorm): only the batch sum has exact per-parameter gradients; use "
                        "reduction='mean'/'sum', penalty_mode='eval', or hvp='double_backprop'"
                    )
        return penalty_at(model, x_adv, y, q=q, loss_fn=loss_fn)
