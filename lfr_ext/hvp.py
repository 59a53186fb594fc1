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
``compiled``         double backprop with each inner step and the penalty step compiled
                     whole by ``torch.compile`` (autograd traced into the graph,
                     :mod:`lfr_ext.compiled`); penalty exact to first order, batch-reduced
                     only. Never picked by ``auto``.
``auto``             ``linearized`` when the loss is the default cross-entropy and every op
                     of the model is covered, else ``double_backprop`` (with a one-time
                     warning naming the op that is not covered).
==================== ====================================================================
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import compiled
from .distributed import identity_autograd_functions, sharded_modules
from .linearized import DeclinedOpError, TangentTape, UnsupportedOpError
from .reference import (LossFn, grad_and_hvp_double_backprop, grad_norm_reference, input_gradient, logits_hint,
                        penalty_at)

logger = logging.getLogger("lfr_ext")

# The op classes (lfr_ext.linearized.TangentTape.depends_on_source_through) that hvp="auto" leaves
# to double backprop, with the measurement that decided it: their linearized inner step was not
# faster than double backprop's, in gradients, in bench/bench_tangent.py.
AUTO_DECLINED_CLASSES: dict[str, str] = {}

HVP_METHODS = ("auto", "linearized", "double_backprop", "forward", "finite_difference", "compiled")
FINITE_DIFFERENCE_RADIUS = 1e-3

# Models found not covered by the linearized pass: model -> op name (weak: models may die).
_UNCOVERED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# Recordings verified against autograd: model -> {(pass, module modes): couples_samples}.
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_WARNED: set[tuple[str, str]] = set()


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


def _record(model: nn.Module, x: torch.Tensor, declined=None) -> tuple[TangentTape, torch.Tensor]:
    with TangentTape(x, declined) as tape, tape.through_input_aliases(sharded_modules(model)):
        logits = model(x)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(logits_hint(logits))  # the caller's model, not the engine, needs a change
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise UnsupportedOpError("a model output that is not a (B, C) logits tensor")
    if not tape.carries(logits):
        raise UnsupportedOpError("a model whose output the tape did not see computed (a custom autograd.Function or a "
                                 "torch.compile'd region?)")
    return tape, logits


# Tolerance of the adjoint test per dtype: rounding (TF32 convolutions included) stays far
# below it, a branch the tape did not see gives an O(1) disagreement.
_ADJOINT_RTOL = {torch.float64: 1e-8, torch.float32: 1e-2}


def _custom_functions(root) -> list[str]:
    """Names of custom ``autograd.Function`` nodes in the graph behind ``root``: their
    backward may not be the derivative of the forward the tape recorded (straight-through
    estimators, gradient reversal), so they are refused. Wrappers' identity functions (FSDP2's
    post-backward registration) are not counted."""
    found, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and \
                not issubclass(node._forward_cls, identity_autograd_functions()):
            found.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _verify(tape: TangentTape, x: torch.Tensor, logits: torch.Tensor) -> bool:
    """Check the recording against autograd before trusting it; return whether samples couple.

    * No custom ``autograd.Function`` in the graph (see :func:`_custom_functions`).
    * Adjoint test with random ``v`` (like ``x``) and ``w`` (like the logits):
      ``w^T (J v)`` from the tape must equal ``(J^T w)^T v`` from autograd. A computation the
      tape did not see (``torch._C.DisableTorchFunction``, a compiled region) breaks it.
    * Coupling: ``v`` supported on sample 0 only must give a tangent that is exactly 0 on the
      other samples, unless an op mixes samples (batch statistics, a mean over the batch).

    Costs one VJP, two tangent passes and one host sync; run once per model and module modes.
    """
    custom = _custom_functions(logits)
    if custom:
        raise UnsupportedOpError(f"custom autograd.Function {custom[0]}")
    generator = torch.Generator(device=x.device).manual_seed(0)  # private: the global RNG is the user's
    v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    w = torch.randn(logits.shape, generator=generator, device=x.device, dtype=logits.dtype)
    (jt_w,) = torch.autograd.grad(logits, x, grad_outputs=w, retain_graph=True)
    with torch.no_grad():
        jv = tape.tangent(v, logits)
        v0 = torch.zeros_like(v)
        v0[:1] = v[:1]
        leak = tape.tangent(v0, logits)[1:].abs().sum()
        tape_side = (w.double() * jv.double()).sum()
        autograd_side = (jt_w.double() * v.double()).sum()
        scale = (w.double() * jv.double()).abs().sum() + (jt_w.double() * v.double()).abs().sum()
        checks = torch.stack([(tape_side - autograd_side).abs(), scale, leak.double()]).tolist()
    gap, scale, leak = checks
    if not gap <= _ADJOINT_RTOL.get(logits.dtype, 5e-2) * scale:  # NaN fails too
        raise UnsupportedOpError(
            "a computation the tape did not record (a region hidden from torch's function API?): "
            f"the adjoint test w^T J v = (J^T w)^T v fails by {gap / max(scale, 1e-300):.2e} (relative)"
        )
    return leak > 0 or tape.couples_samples


def _rng_states(device: torch.device):
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _restore_rng_states(device: torch.device, states) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


# ---------------------------------------------------------------------------------------
# Inner step: (g, h)
# ---------------------------------------------------------------------------------------
def _scaled(total: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    return total if loss_scale is None else total * loss_scale


def _unscaled(grad: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    return grad if loss_scale is None else grad / loss_scale


def grad_and_hvp_linearized(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
                            verify: bool = False, loss_scale: torch.Tensor | None = None, declined=None):
    """``g`` and ``h = H v`` by the linearized tangent pass; default cross-entropy only.

    One forward (recorded), one backward for ``g`` (graph kept), one tangent pass for
    ``J v`` (no graph), one backward for ``J^T (diag(p) - p p^T) J v``. Both (B, ...), detached.

    If the forward used batch statistics (BatchNorm with ``track_running_stats=False``), ``J``
    itself depends on ``x`` and ``H v`` gains the term ``(dJ/dx v)^T (p - e_y)``: then the
    tangent is replayed under autograd and ``h = grad_x[(p - e_y)^T J v]`` (still exact).
    ``verify`` runs :func:`_verify` first. ``loss_scale`` (fp16 mixed precision): both
    backwards run scaled and ``g``, ``h`` are unscaled out of place. ``declined``: op classes
    to refuse (:class:`lfr_ext.linearized.TangentTape`).
    """
    x_adv = x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_adv, declined)
    if verify:
        _verify(tape, x_adv, logits)
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(_scaled(losses.sum(), loss_scale), x_adv, retain_graph=True)
    g = _unscaled(g, loss_scale)
    v = norm_subgradient(g, q)
    if tape.depends_on_source:
        surrogate = (_cross_entropy_residual(logits, y) * tape.tangent(v, logits)).sum()
        (h,) = torch.autograd.grad(_scaled(surrogate, loss_scale), x_adv)
        return g, _unscaled(h, loss_scale)
    with torch.no_grad():
        jv = tape.tangent(v, logits)
        p = torch.softmax(logits.detach(), dim=-1)
        w = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)  # (diag(p) - p p^T) J v
    (h,) = torch.autograd.grad(logits, x_adv, grad_outputs=_scaled(w, loss_scale).to(logits.dtype))
    return g, _unscaled(h, loss_scale)


def grad_and_hvp_forward(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
                         loss_scale: torch.Tensor | None = None):
    """``g`` and ``h`` by ``torch.func``: ``h = jvp(grad(sum l), x', v)`` (forward-over-reverse)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def total_loss(z):
        losses = loss_fn(torch.func.functional_call(model, (params, buffers), (z,)), y)
        return _scaled(losses.sum(), loss_scale)

    x = x_adv.detach()
    g = _unscaled(torch.func.grad(total_loss)(x), loss_scale)
    v = norm_subgradient(g, q)
    _, h = torch.func.jvp(torch.func.grad(total_loss), (x,), (v,))
    return g.detach(), _unscaled(h, loss_scale).detach()


def grad_and_hvp_finite_difference(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
                                   loss_scale: torch.Tensor | None = None):
    """Approximate ``h = (g(x' + r v) - g(x' - r v)) / 2r``, ``r`` chosen per sample so the
    largest coordinate moves by ``FINITE_DIFFERENCE_RADIUS``. Eval-mode models only (the
    per-sample radii assume samples do not interact)."""

    def grad_at(z):
        return input_gradient(model, z.detach().requires_grad_(True), y, loss_fn, create_graph=False,
                              loss_scale=loss_scale)

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
                       verify: bool = False, loss_scale: torch.Tensor | None = None,
                       declined=None) -> tuple[torch.Tensor, bool | None]:
    """Per-sample ``||g_i||_q`` (B,) whose derivatives (w.r.t. the parameters, and ``x'``
    if it requires grad) are those of ``sum_i (p_i - e_{y_i})^T (J s)_i``, ``s`` fixed.

    Returns ``(penalty, couples_samples)``; ``couples_samples`` is None unless ``verify``
    (which runs :func:`_verify` and finds out). When samples couple (train-mode BatchNorm, a
    mean over the batch) only the *sum* of the returned vector has exact derivatives.
    ``loss_scale``: the backward for ``g`` runs scaled, ``g`` is unscaled (the surrogate's own
    derivatives are taken by the caller's scaled backward). ``declined`` as for
    :func:`grad_and_hvp_linearized`.
    """
    x_in = x_adv if x_adv.requires_grad else x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_in, declined)
    couples = _verify(tape, x_in, logits) if verify else None
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(_scaled(losses.sum(), loss_scale), x_in, retain_graph=True)
    g = _unscaled(g, loss_scale)
    norms = grad_norm_reference(g, q)  # the value, exactly as double backprop computes it
    s = norm_subgradient(g, q)
    jvp = tape.tangent(s, logits)  # recorded with grad: depends on the weights (and x')
    surrogate = (_cross_entropy_residual(logits, y) * jvp).sum(dim=-1)
    # Value of `norms`, derivatives of `surrogate` (equal functions of the weights locally).
    return norms + (surrogate - surrogate.detach()), couples


# ---------------------------------------------------------------------------------------
# Double backprop through attention
# ---------------------------------------------------------------------------------------
_ATTENTION_WARNED: set[str] = set()


def _has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules())


@contextlib.contextmanager
def twice_differentiable_attention(model: nn.Module):
    """Inside the block, ``scaled_dot_product_attention`` runs on its math backend.

    PyTorch's fused attention kernels (flash, memory-efficient, the CPU flash kernel) have no
    double backward ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented"); the math backend is composed of matmuls and a softmax, which have. The
    double-backprop passes run in this block, so their graphs can be differentiated again (the
    penalty's parameter gradient included). Said once per model class that has attention."""
    if _has_attention(model) and type(model).__qualname__ not in _ATTENTION_WARNED:
        _ATTENTION_WARNED.add(type(model).__qualname__)
        warnings.warn(f"lfr_ext: double backprop runs {type(model).__name__}'s scaled_dot_product_attention on its "
                      "math backend (PyTorch's fused attention kernels have no double backward)", RuntimeWarning,
                      stacklevel=4)
    with sdpa_kernel(SDPBackend.MATH):
        yield


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

    def __init__(self, hvp: str, model: nn.Module, default_loss: bool, norm_fn: Callable = grad_norm_reference,
                 loss_scale: torch.Tensor | None = None):
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if hvp == "compiled" and loss_scale is not None:
            raise ValueError("hvp='compiled' does not take a grad_scaler; use hvp='auto' for fp16 mixed precision")
        if hvp == "linearized" and not default_loss:
            raise ValueError(
                "hvp='linearized' needs the default cross-entropy loss (its Hessian in the logits is "
                "diag(p) - p p^T); pass loss_fn=None or use hvp='double_backprop'"
            )
        self.requested = hvp
        # auto leaves the op classes it measured slower on the linearized engine to double backprop.
        self.declined = AUTO_DECLINED_CLASSES if hvp == "auto" else None
        self.model = model
        self.norm_fn = norm_fn  # per-sample ||g||_q of the double-backprop paths (the fused op)
        self.loss_scale = loss_scale  # GradScaler's scale (fp16 mixed precision), or None
        if hvp == "auto":
            uncovered = _UNCOVERED.get(model)
            self.method = "linearized" if default_loss and uncovered is None else "double_backprop"
            reason = "custom loss_fn" if not default_loss else (f"`{uncovered}` not covered" if uncovered else "")
        else:
            self.method, reason = hvp, "requested"
        logger.debug("lfr_ext: hvp=%r -> %s%s", hvp, self.method, f" ({reason})" if reason else "")

    def _fall_back(self, error: UnsupportedOpError) -> None:
        """auto: remember the model as uncovered, warn once, use double backprop; else raise."""
        if self.requested != "auto":
            raise error
        _UNCOVERED[self.model] = error.op
        key = (type(self.model).__qualname__, error.op)
        if isinstance(error, DeclinedOpError):  # a measured choice, not a gap: said in lfr_ext.info and here
            logger.info("lfr_ext: hvp='auto' -> double_backprop for %s: %s", type(self.model).__name__, error)
            self.method = "double_backprop"
            return
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"lfr_ext: hvp='auto' falls back to double backprop for {type(self.model).__name__}: {error}",
                RuntimeWarning, stacklevel=4,
            )
        logger.debug("lfr_ext: hvp='auto' -> double_backprop (%s)", error.op)
        self.method = "double_backprop"

    @staticmethod
    def _key(kind: str, model: nn.Module) -> tuple:
        return kind, tuple(m.training for m in model.modules())

    def _attempt(self, model, x_adv, kind: str, run):
        """Run a linearized pass; verify it the first time for this model and modes. Until
        verified, the RNG state is saved so a fallback redraws the same noise and masks."""
        key = self._key(kind, model)
        verified = _VERIFIED.get(model, {})
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        verify = key not in verified and not capturing
        states = _rng_states(x_adv.device) if verify else None
        try:
            result, couples = run(verify)
        except UnsupportedOpError as error:
            if states is not None:
                _restore_rng_states(x_adv.device, states)
            self._fall_back(error)
            return None, None, states
        if verify:
            _VERIFIED.setdefault(model, {})[key] = couples
        return result, verified.get(key, couples), states

    def grad_and_hvp(self, model, x_adv, y, loss_fn, q):
        if self.method == "linearized":
            result, _, _ = self._attempt(
                model, x_adv, "inner", lambda verify: (grad_and_hvp_linearized(model, x_adv, y, loss_fn, q, verify,
                                                                               loss_scale=self.loss_scale,
                                                                               declined=self.declined), None))
            if result is not None:
                return result
        if self.method == "double_backprop":
            with twice_differentiable_attention(model):
                return grad_and_hvp_double_backprop(model, x_adv, y, loss_fn, q, norm_fn=self.norm_fn,
                                                    loss_scale=self.loss_scale)
        if self.method == "compiled":
            return compiled.engine_for(model, loss_fn, q).grad_and_hvp(x_adv, y)
        return self._INNER[self.method](model, x_adv, y, loss_fn, q, loss_scale=self.loss_scale)

    def penalty(self, model, x_adv, y, loss_fn, q, reduction: str) -> torch.Tensor:
        """Per-sample penalties (B,) in the model's current mode."""
        if self.method == "compiled":
            if reduction == "none" or x_adv.requires_grad:
                raise ValueError("hvp='compiled' gives the penalty reduced over the batch (reduction='mean' or 'sum') "
                                 "and its gradient w.r.t. the parameters only (x must not require grad)")
            return compiled.engine_for(model, loss_fn, q).penalty(x_adv, y)
        if self.method == "linearized" and reduction == "none" and _VERIFIED.get(model, {}).get(self._key("penalty", model)):
            self._refuse_or_skip_coupled()
        elif self.method == "linearized":
            penalty, couples, states = self._attempt(
                model, x_adv, "penalty", lambda verify: penalty_linearized(model, x_adv, y, q, verify,
                                                                           loss_scale=self.loss_scale,
                                                                           declined=self.declined))
            if penalty is not None:
                if not (couples and reduction == "none"):
                    return penalty
                self._refuse_or_skip_coupled()
                if states is not None:  # same Dropout masks for the exact per-sample pass
                    _restore_rng_states(x_adv.device, states)
        with twice_differentiable_attention(model):
            return penalty_at(model, x_adv, y, q=q, loss_fn=loss_fn, norm_fn=self.norm_fn, loss_scale=self.loss_scale)

    def _refuse_or_skip_coupled(self) -> None:
        if self.requested == "linearized":
            raise ValueError(
                "hvp='linearized' with reduction='none' on a model whose penalty pass couples samples "
                "(train-mode BatchNorm, a mean over the batch): only the batch sum has exact per-parameter "
                "gradients; use reduction='mean'/'sum', penalty_mode='eval', or hvp='double_backprop'"
            )
        logger.debug("lfr_ext: reduction='none' on a sample-coupling pass -> double_backprop")
