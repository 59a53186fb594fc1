r"""How LFR's second-order products are computed: the ``hvp=`` selector.

Every inner ascent step needs the input gradient ``g = grad_x' sum_i l_i`` and the
Hessian-vector product ``h = H v`` with ``v = d sum_i ||g_i||_q / dg`` (``sign(g)`` for q=1);
the penalty needs ``grad_theta mean_i ||g_i||_q``.

==================== ====================================================================
``double_backprop``  the authors' way: ``create_graph=True`` and a gradient of a gradient
                     (exact, any model; ~4.7x a gradient per HVP on GPU)
``linearized``       the exact linearized tangent pass (:mod:`lfr_ext.linearized`), for the
                     cross-entropy loss: for networks piecewise linear in x,
                     ``H v = J^T (diag(p) - p p^T) J v``: one tangent pass plus one VJP
                     through the graph the gradient pass kept (~2 gradients per step); for
                     any other network of covered ops (smooth activations, normalisations,
                     softmax, attention) ``H v = grad_x[(p - e_y)^T J(x) v]``, the tangent
                     replayed under autograd and one more backward. The
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
                     warning naming the op that is not covered). Op classes measured slower
                     on the linearized engine (:data:`AUTO_DECLINED_CLASSES`, shown by
                     ``python -m lfr_ext.info``) are left to double backprop too.
==================== ====================================================================

:class:`SecondOrderEngine` resolves ``hvp=`` for one call and computes both the inner products
and the penalty; what it learns about a model (a refused recording, a verified one) lives in
one explicit :class:`EngineCache`, :data:`CACHE`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import compiled
from .wrapped import identity_autograd_functions, sharded_modules
from .linearized import DeclinedOpError, TangentTape, UnsupportedOpError
from .linearized.verify import verify_recording
from .reference import (LossFn, grad_and_hvp_double_backprop, grad_norm_reference, input_gradient, logits_hint,
                        penalty_at)

logger = logging.getLogger("lfr_ext")

# The op classes (lfr_ext.linearized.TangentTape.depends_on_source_through) that hvp="auto" leaves
# to double backprop, with the measurement that decided it: bench/bench_tangent.py's inner step,
# in gradients, slower on the linearized engine than by double backprop beyond the spread of
# repeated runs. (The other classes: ConvNeXt, LayerNorm and GELU, 4.2-4.8 vs 4.8-6.9 gradients;
# WRN-16-4-SiLU 2.6-3.3 vs 2.6-3.3, mean of six runs 2.95 vs 2.94; the same files.)
AUTO_DECLINED_CLASSES: dict[str, str] = {
    "attention": "ViT-tiny's inner step costs 3.7-4.3 gradients linearized vs 2.6-3.1 by double backprop on the "
                 "development CPU, bench/results/cpu-2core-x86_64-2026-12-01-tangent-beyond-relu-*.json; "
                 "hvp='linearized' still runs it, exactly",
}

HVP_METHODS = ("auto", "linearized", "double_backprop", "forward", "finite_difference", "compiled")
FINITE_DIFFERENCE_RADIUS = 1e-3

class EngineCache:
    """What the second-order engine learned about models, for the whole process.

    * ``uncovered``: model -> the op its recording refused (``hvp="auto"`` then runs double
      backprop for it without recording again);
    * ``verified``: model -> {(pass, module modes): whether the pass couples samples}, the
      recordings checked against autograd once;
    * ``warned``: the one-time warnings already given.

    Weak in the models. :data:`CACHE` is the one the engine uses: ``CACHE.clear()`` forgets
    everything, ``with CACHE.scoped():`` runs a block with a fresh cache and puts the old one back.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.uncovered: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
        self.verified: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
        self.warned: set[tuple] = set()

    @contextlib.contextmanager
    def scoped(self):
        saved = self.uncovered, self.verified, self.warned
        self.clear()
        try:
            yield self
        finally:
            self.uncovered, self.verified, self.warned = saved

    def warn_once(self, key: tuple, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=5)


CACHE = EngineCache()


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


class _RngCheckpoint:
    """The CPU (and ``device``'s CUDA) RNG state now, to rewind to: a pass redone by another
    engine then draws the same start noise and Dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


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
    ``verify`` runs :func:`lfr_ext.linearized.verify.verify_recording` first. ``loss_scale`` (fp16 mixed precision): both
    backwards run scaled and ``g``, ``h`` are unscaled out of place. ``declined``: op classes
    to refuse (:class:`lfr_ext.linearized.TangentTape`).
    """
    x_adv = x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_adv, declined)
    if verify:
        verify_recording(tape, x_adv, logits, identity_autograd_functions())
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
    (which runs :func:`lfr_ext.linearized.verify.verify_recording` and finds out). When samples couple (train-mode BatchNorm, a
    mean over the batch) only the *sum* of the returned vector has exact derivatives.
    ``loss_scale``: the backward for ``g`` runs scaled, ``g`` is unscaled (the surrogate's own
    derivatives are taken by the caller's scaled backward). ``declined`` as for
    :func:`grad_and_hvp_linearized`.
    """
    x_in = x_adv if x_adv.requires_grad else x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_in, declined)
    couples = verify_recording(tape, x_in, logits, identity_autograd_functions()) if verify else None
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
    if _has_attention(model):
        CACHE.warn_once(("attention", type(model).__qualname__),
                        f"lfr_ext: double backprop runs {type(model).__name__}'s scaled_dot_product_attention on its "
                        "math backend (PyTorch's fused attention kernels have no double backward)")
    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------------------
# The engine for one call: which method, with auto's fallback
# ---------------------------------------------------------------------------------------
class Result(NamedTuple):
    """What a linearized pass gives the engine: its ``value`` and whether it couples samples
    (None when not verified in this call); ``rng``, to rewind for a pass redone another way."""

    value: object
    couples: bool | None
    rng: _RngCheckpoint | None


class SecondOrderEngine:
    """``hvp=`` for one call: the inner ``(g, H v)`` and the penalty, each by the method chosen.

    ``method`` is read per pass from the request and :data:`CACHE`: ``auto`` gives
    ``linearized`` for the default loss until the model's recording is refused, and
    ``double_backprop`` after that (a refusal is remembered, warned once, and the pass redone by
    double backprop from the same RNG state); an explicit ``linearized`` raises instead.
    """

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
        self.model = model
        self.default_loss = default_loss
        self.norm_fn = norm_fn  # per-sample ||g||_q of the double-backprop paths (the fused op)
        self.loss_scale = loss_scale  # GradScaler's scale (fp16 mixed precision), or None
        # auto leaves the op classes it measured slower on the linearized engine to double backprop.
        self.declined = AUTO_DECLINED_CLASSES if hvp == "auto" else None
        logger.debug("lfr_ext: hvp=%r -> %s", hvp, self.method)

    @property
    def method(self) -> str:
        if self.requested != "auto":
            return self.requested
        if not self.default_loss or self.model in CACHE.uncovered:
            return "double_backprop"
        return "linearized"

    def _key(self, kind: str) -> tuple:
        return kind, tuple(m.training for m in self.model.modules())

    def _linearized(self, kind: str, x_adv: torch.Tensor, run: Callable[[bool], tuple]) -> Result | None:
        """``run(verify) -> (value, couples)``, verified the first time for this model and modes
        (not while a CUDA graph is being captured: verification syncs). None when the recording
        was refused under ``auto``: the refusal is in :data:`CACHE`. A pass that was being
        verified rewinds the RNG when refused (so the double-backprop redo draws the same noise
        and Dropout masks); a refusal after verification (data-dependent control flow) does not."""
        key = self._key(kind)
        verified = CACHE.verified.get(self.model, {})
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        verify = key not in verified and not capturing
        rng = _RngCheckpoint(x_adv.device) if verify else None
        try:
            value, couples = run(verify)
        except UnsupportedOpError as error:
            if rng is not None:
                rng.rewind()
            if self.requested != "auto":
                raise
            self._remember_refusal(error)
            return None
        if verify:
            CACHE.verified.setdefault(self.model, {})[key] = couples
        return Result(value, verified.get(key, couples), rng)

    def _remember_refusal(self, error: UnsupportedOpError) -> None:
        CACHE.uncovered[self.model] = error.op
        name = type(self.model).__name__
        if isinstance(error, DeclinedOpError):  # a measured choice, not a gap: said in lfr_ext.info and here
            logger.info("lfr_ext: hvp='auto' -> double_backprop for %s: %s", name, error)
            return
        CACHE.warn_once((type(self.model).__qualname__, error.op),
                        f"lfr_ext: hvp='auto' falls back to double backprop for {name}: {error}")
        logger.debug("lfr_ext: hvp='auto' -> double_backprop (%s)", error.op)

    def grad_and_hvp(self, model, x_adv, y, loss_fn, q):
        """``(g, H v)`` at ``x_adv`` (B, ...) each, detached."""
        method = self.method
        if method == "linearized":
            result = self._linearized("inner", x_adv, lambda verify: (grad_and_hvp_linearized(
                model, x_adv, y, loss_fn, q, verify, loss_scale=self.loss_scale, declined=self.declined), None))
            if result is not None:
                return result.value
            method = "double_backprop"
        if method == "double_backprop":
            with twice_differentiable_attention(model):
                return grad_and_hvp_double_backprop(model, x_adv, y, loss_fn, q, norm_fn=self.norm_fn,
                                                    loss_scale=self.loss_scale)
        if method == "compiled":
            return compiled.engine_for(model, loss_fn, q).grad_and_hvp(x_adv, y)
        if method == "forward":
            return grad_and_hvp_forward(model, x_adv, y, loss_fn, q, loss_scale=self.loss_scale)
        return grad_and_hvp_finite_difference(model, x_adv, y, loss_fn, q, loss_scale=self.loss_scale)

    def penalty(self, model, x_adv, y, loss_fn, q, reduction: str) -> torch.Tensor:
        """Per-sample penalties (B,) in the model's current mode, by the first case that applies:

        * ``compiled``: the compiled engine (batch-reduced, parameter gradients only);
        * ``linearized`` whose pass is known to couple samples, with ``reduction="none"``:
          double backprop (only the batch sum has exact per-parameter gradients there; an
          explicit ``linearized`` raises);
        * ``linearized``: the linearized pass, unless its recording is refused (``auto``: double
          backprop) or turns out to couple samples with ``reduction="none"`` (as above, redone
          from the same RNG state, so with the same Dropout masks);
        * every other method: double backprop (the authors' penalty).
        """
        method = self.method
        if method == "compiled":
            if reduction == "none" or x_adv.requires_grad:
                raise ValueError("hvp='compiled' gives the penalty reduced over the batch (reduction='mean' or 'sum') "
                                 "and its gradient w.r.t. the parameters only (x must not require grad)")
            return compiled.engine_for(model, loss_fn, q).penalty(x_adv, y)
        if method == "linearized" and reduction == "none" and \
                CACHE.verified.get(self.model, {}).get(self._key("penalty")):
            self._refuse_or_skip_coupled()
            return self._penalty_double_backprop(model, x_adv, y, loss_fn, q)
        if method == "linearized":
            result = self._linearized("penalty", x_adv, lambda verify: penalty_linearized(
                model, x_adv, y, q, verify, loss_scale=self.loss_scale, declined=self.declined))
            if result is not None and not (result.couples and reduction == "none"):
                return result.value
            if result is not None:
                self._refuse_or_skip_coupled()
                if result.rng is not None:
                    result.rng.rewind()
        return self._penalty_double_backprop(model, x_adv, y, loss_fn, q)

    def _penalty_double_backprop(self, model, x_adv, y, loss_fn, q) -> torch.Tensor:
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
