r"""``hvp="linearized"``: the exact linearized tangent pass (:mod:`lfr_ext.linearized`), for the
default cross-entropy loss.

For networks piecewise linear in x, ``H v = J^T (diag(p) - p p^T) J v``: one tangent pass plus
one VJP through the graph the gradient pass kept. For any other network of covered ops (smooth
activations, normalisations, softmax, attention) ``H v = grad_x[(p - e_y)^T J(x) v]``, the
tangent replayed under autograd and one more backward.

The penalty's weight gradient backprops ``sum_i (p_i - e_{y_i})^T (J s)_i`` with
``s = d||g||_q/dg`` fixed, which equals ``sum_i ||g_i||_q`` as a function of the weights around
the current point: exact, train-mode BatchNorm included. (For q=2, ``s = g/||g||`` moves with
the weights, so only first derivatives are exact, which is what training uses; for q=1 and inf,
``s`` is locally constant and all orders are exact.)

The tape and its per-op rules live in :mod:`lfr_ext.linearized`; this module is the engine's
use of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linearized import TangentTape, UnsupportedOpError
from ..linearized.verify import verify_recording
from ..reference import LossFn, grad_norm_reference, logits_hint
from ..wrapped import identity_autograd_functions, sharded_modules
from .facts import MethodFacts
from .scaling import scaled, unscaled
from .subgradient import norm_subgradient

FACTS = MethodFacts(
    name="linearized",
    description="a tangent pass through the recorded forward, then one VJP",
    exact=True,
    auto_may_choose=True,
    needs_default_loss=True,
)


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
        raise UnsupportedOpError(
            "a model whose output the tape did not see computed (a custom autograd.Function or a "
            "torch.compile'd region?)"
        )
    return tape, logits


def grad_and_hvp_linearized(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    verify: bool = False,
    loss_scale: torch.Tensor | None = None,
    declined=None,
):
    """``g`` and ``h = H v`` by the linearized tangent pass; default cross-entropy only.

    One forward (recorded), one backward for ``g`` (graph kept), one tangent pass for
    ``J v`` (no graph), one backward for ``J^T (diag(p) - p p^T) J v``. Both (B, ...), detached.

    If the forward used batch statistics (BatchNorm with ``track_running_stats=False``), ``J``
    itself depends on ``x`` and ``H v`` gains the term ``(dJ/dx v)^T (p - e_y)``: then the
    tangent is replayed under autograd and ``h = grad_x[(p - e_y)^T J v]`` (still exact).
    ``verify`` runs :func:`lfr_ext.linearized.verify.verify_recording` first. ``loss_scale``
    (fp16 mixed precision): both backwards run scaled and ``g``, ``h`` are unscaled out of place.
    ``declined``: op classes to refuse (:class:`lfr_ext.linearized.TangentTape`).
    """
    x_adv = x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_adv, declined)
    if verify:
        verify_recording(tape, x_adv, logits, identity_autograd_functions())
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(scaled(losses.sum(), loss_scale), x_adv, retain_graph=True)
    g = unscaled(g, loss_scale)
    v = norm_subgradient(g, q)
    if tape.depends_on_source:
        surrogate = (_cross_entropy_residual(logits, y) * tape.tangent(v, logits)).sum()
        (h,) = torch.autograd.grad(scaled(surrogate, loss_scale), x_adv)
        return g, unscaled(h, loss_scale)
    with torch.no_grad():
        jv = tape.tangent(v, logits)
        p = torch.softmax(logits.detach(), dim=-1)
        w = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)  # (diag(p) - p p^T) J v
    (h,) = torch.autograd.grad(logits, x_adv, grad_outputs=scaled(w, loss_scale).to(logits.dtype))
    return g, unscaled(h, loss_scale)


def penalty_linearized(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    q: float,
    verify: bool = False,
    loss_scale: torch.Tensor | None = None,
    declined=None,
) -> tuple[torch.Tensor, bool | None]:
    """Per-sample ``||g_i||_q`` (B,) whose derivatives (w.r.t. the parameters, and ``x'``
    if it requires grad) are those of ``sum_i (p_i - e_{y_i})^T (J s)_i``, ``s`` fixed.

    Returns ``(penalty, couples_samples)``; ``couples_samples`` is None unless ``verify``
    (which runs :func:`lfr_ext.linearized.verify.verify_recording` and finds out). When samples
    couple (train-mode BatchNorm, a mean over the batch) only the *sum* of the returned vector has
    exact derivatives.
    ``loss_scale``: the backward for ``g`` runs scaled, ``g`` is unscaled (the surrogate's own
    derivatives are taken by the caller's scaled backward). ``declined`` as for
    :func:`grad_and_hvp_linearized`.
    """
    x_in = x_adv if x_adv.requires_grad else x_adv.detach().requires_grad_(True)
    tape, logits = _record(model, x_in, declined)
    couples = verify_recording(tape, x_in, logits, identity_autograd_functions()) if verify else None
    losses = F.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(scaled(losses.sum(), loss_scale), x_in, retain_graph=True)
    g = unscaled(g, loss_scale)
    norms = grad_norm_reference(g, q)  # the value, exactly as double backprop computes it
    s = norm_subgradient(g, q)
    jvp = tape.tangent(s, logits)  # recorded with grad: depends on the weights (and x')
    surrogate = (_cross_entropy_residual(logits, y) * jvp).sum(dim=-1)
    # Value of `norms`, derivatives of `surrogate` (equal functions of the weights locally).
    return norms + (surrogate - surrogate.detach()), couples
