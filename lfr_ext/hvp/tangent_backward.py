r"""The input gradient ``g = grad_x sum_i l_i(f(x))`` whose own backward runs on the tangent pass.

Any scalar ``Phi(g)`` a gradient penalty builds from ``g`` is backpropagated with the cotangent
``v = dPhi/dg`` (B, ...). For that fixed ``v``, with ``f`` the model's outputs and ``r = l'(f)``
the loss head's derivative at them (for the cross-entropy ``r = p - e_y``),

.. math::
    v^\top g = r^\top (J v),

so the backward of ``Phi(g)`` w.r.t. the parameters ``theta`` and the input ``x`` is the
gradient of the scalar ``r^T (J v)``: one tangent pass of ``v`` through the recorded forward
(:class:`lfr_ext.linearized.TangentTape`, replayed with autograd on) and one backward through it
and the forward graph. Double backprop builds the second-order graph of the first backward instead.

:class:`_TangentBackward` is that backward as an ``autograd.Function``. Its forward returns
``g`` (and the model's outputs, when asked for); its backward takes ``v`` (and the outputs'
cotangent ``w``) and returns the gradients of ``r^T (J v) + w^T f`` w.r.t. ``x`` and the leaves the
forward graph reaches (the parameters, whatever tensors produced them), which autograd then
accumulates like any other gradient (DDP's all-reduce hooks on the parameters included). The
forward graph is traversed only by this backward, never by the caller's, so its buffers stay
alive until the output is freed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..linearized import TangentTape, UnsupportedOpError
from ..linearized.verify import verify_recording
from ..reference import LossFn, default_loss
from ..wrapped import identity_autograd_functions
from .scaling import scaled, unscaled


class Recorded(NamedTuple):
    """One recorded forward at ``source`` (B, ...): its ``outputs`` (B, ...) and the loss head's
    derivative there, ``residual = d sum_i l_i / d outputs`` (same shape, with its graph)."""

    tape: TangentTape
    source: torch.Tensor
    outputs: torch.Tensor
    residual: torch.Tensor
    g: torch.Tensor  # (B, ...) like source, detached and unscaled
    autocast: torch.autocast  # the autocast state of the forward, for the tangent's replay


def loss_residual(outputs: torch.Tensor, y, loss_fn: LossFn | None, losses: torch.Tensor) -> torch.Tensor:
    """``d sum_i l_i / d outputs`` with its graph (so that it is differentiable w.r.t. the outputs).

    Default cross-entropy: ``softmax(outputs) - onehot(y)`` in closed form. Any other loss head:
    autograd on the head alone (``losses`` must be ``loss_fn(outputs, y)``), a graph the size of
    the outputs."""
    if loss_fn is None:
        classes = outputs.shape[-1]
        return torch.softmax(outputs, dim=-1) - torch.nn.functional.one_hot(y.long(), classes).to(outputs.dtype)
    (residual,) = torch.autograd.grad(losses.sum(), outputs, create_graph=True)
    return residual


def checked_losses(outputs, y, loss_fn: LossFn | None, batch: int) -> torch.Tensor:
    """``loss_fn(outputs, y)`` (default: per-sample cross-entropy), checked to be (B,)."""
    losses = default_loss(outputs, y) if loss_fn is None else loss_fn(outputs, y)
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({batch},), got {shape}; "
            "use reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
        )
    return losses


def record(
    model: nn.Module,
    source: torch.Tensor,
    y,
    loss_fn: LossFn | None,
    *,
    verify: bool,
    loss_scale: torch.Tensor | None,
    declined=None,
) -> tuple[Recorded, bool | None]:
    """Run ``model(source)`` under the tape and take the first-order ``g`` (graph kept).

    ``source`` requires grad (a leaf, or the caller's ``x``). Raises :class:`UnsupportedOpError`
    where the tape cannot record the model (an op with no rule, an output that is not a tensor or
    that the tape did not see computed, a recording that fails the adjoint test when ``verify``).
    Returns the recording and, when verified, whether it couples samples (else None)."""
    with TangentTape(source, declined) as tape:
        outputs = model(source)
    if not isinstance(outputs, torch.Tensor):
        raise UnsupportedOpError(f"a model output of type {type(outputs).__name__} (the tape follows one tensor)")
    if outputs.dim() == 0 or outputs.shape[0] != source.shape[0]:
        raise UnsupportedOpError("a model output without the batch dimension first")
    if not tape.carries(outputs):
        raise UnsupportedOpError(
            "a model whose output the tape did not see computed (a custom autograd.Function or a "
            "torch.compile'd region?)"
        )
    couples = verify_recording(tape, source, outputs, identity_autograd_functions()) if verify else None
    losses = checked_losses(outputs, y, loss_fn, source.shape[0])
    residual = loss_residual(outputs, y, loss_fn, losses)
    (g,) = torch.autograd.grad(scaled(losses.sum(), loss_scale), source, retain_graph=True)
    device = source.device.type
    autocast = torch.autocast(
        device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device), cache_enabled=False
    )
    return Recorded(tape, source, outputs, residual, unscaled(g, loss_scale), autocast), couples


def _leaves(roots: tuple[torch.Tensor, ...], source: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``roots``' graph reaches, other than the recording's
    own leaf ``source`` (its gradient is returned separately, as the caller's ``x``'s)."""
    found: dict[int, torch.Tensor] = {}
    seen: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            if variable is not source:
                found.setdefault(id(variable), variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


class _TangentBackward(torch.autograd.Function):
    """``(g, outputs)`` as given, whose backward is the tangent-pass identity (module docstring).

    Inputs: ``g`` and ``outputs`` detached (values only), the :class:`Recorded` pass (recorded on
    a detached leaf copy of ``x``), the caller's ``x``, the leaves. The recording's gradient w.r.t.
    its own leaf is returned as ``x``'s, so a parameter that also produced ``x`` (a tied embedding,
    a generator sharing weights) gets the path through ``x`` once, from autograd, as it would
    with double backprop."""

    @staticmethod
    def forward(ctx, g, outputs, recorded, x, *leaves):
        ctx.recorded = recorded
        ctx.leaves = leaves
        return g.view_as(g), outputs.view_as(outputs)

    @staticmethod
    def backward(ctx, v, w):
        recorded: Recorded = ctx.recorded
        if torch.is_grad_enabled():
            # The caller's backward asked for a differentiable one (create_graph=True): third-order
            # derivatives, which the identity (for a fixed v) does not give; refused, not wrong.
            raise RuntimeError(
                "input_grad(hvp='linearized'): a backward with create_graph=True through g (third-order "
                "derivatives) is not supported; use hvp='double_backprop' for it"
            )
        wanted = [ctx.needs_input_grad[3], *ctx.needs_input_grad[4:]]
        targets = [t for t, needed in zip((recorded.source, *ctx.leaves), wanted) if needed]
        with torch.enable_grad():
            terms, cotangents = [], []
            if v is not None:
                # The recorded maps run as the forward ran: under its autocast state (the caller's
                # backward runs outside any autocast block).
                with recorded.autocast:
                    jv = recorded.tape.tangent(v.to(recorded.source.dtype), recorded.outputs)
                    terms.append((recorded.residual * jv).sum())
                cotangents.append(None)
            if w is not None:
                terms.append(recorded.outputs)
                cotangents.append(w)
            if not terms or not targets:
                return (None, None, None, None, *(None for _ in ctx.leaves))
            grads = iter(
                torch.autograd.grad(
                    terms,
                    targets,
                    grad_outputs=cotangents,
                    retain_graph=True,  # a second backward of the caller's (retain_graph=True) may come
                    allow_unused=True,
                )
            )
        result = [next(grads) if needed else None for needed in wanted]
        return (None, None, None, *result)


def input_grad_linearized(
    model: nn.Module,
    x: torch.Tensor,
    y,
    loss_fn: LossFn | None,
    *,
    verify: bool,
    loss_scale: torch.Tensor | None = None,
    declined=None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], bool | None]:
    """``(g, outputs)`` at ``x`` with ``g``'s backward on the tangent pass, and whether the
    recording couples samples (None unless ``verify``). ``g`` (B, ...) like ``x``, ``outputs``
    the model's (B, ...); both differentiable w.r.t. the parameters and ``x`` (when ``x`` requires
    grad). ``loss_scale``: the first-order backward runs on the fp16-scaled loss
    (:mod:`lfr_ext.hvp.scaling`), ``g`` is unscaled."""
    # Recorded on a leaf copy: the caller's graph behind x is reached once, through x's gradient.
    source = x.detach().requires_grad_(True)
    recorded, couples = record(model, source, y, loss_fn, verify=verify, loss_scale=loss_scale, declined=declined)
    leaves = _leaves((recorded.outputs, recorded.residual), source)
    g, outputs = _TangentBackward.apply(recorded.g.detach(), recorded.outputs.detach(), recorded, x, *leaves)
    return (g, outputs), couples
