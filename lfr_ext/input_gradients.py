r"""``lfr_ext.input_grad``: the input gradient as a differentiable tensor, for any gradient penalty.

Every input-gradient regulariser (Gradient Norm, input-gradient regularisation, CURE, GradAlign,
LLR, Jacobian regularisation, WGAN-GP, R1) takes ``g = grad_x sum_i l_i`` and backpropagates a
function of it to the weights. The usual code is::

    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)     # double backprop

and with lfr_ext::

    g = lfr_ext.input_grad(model, x, y)                          # the same g, the same derivatives

``g``'s backward is the exact tangent-pass identity of :mod:`lfr_ext.hvp.tangent_backward`
(``hvp="linearized"``), or double backprop (``hvp="double_backprop"``); ``hvp="auto"`` runs the
first where the tape covers the model, like :func:`lfr_ext.flatness_penalty`'s engine.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._state import BufferSnapshot
from ._validation import LABEL_DTYPES, check_grad_scaler, check_model
from .hvp import SecondOrderEngine
from .hvp.double_backprop import twice_differentiable_attention
from .hvp.scaling import input_gradient_scale, scaled, unscaled
from .hvp.tangent_backward import checked_losses, input_grad_linearized
from .linearized import UnsupportedOpError
from .wrapped import check_data_parallel, sharded_modules, sync_buffers_as_forward_would, unwrapped

# The hvp= methods input_grad takes: the others are LFR's inner-step methods (an HVP along the
# ascent direction, not a backward of g).
INPUT_GRAD_METHODS = ("auto", "linearized", "double_backprop")

# What hvp="auto" runs per device type. CPU: double backprop, measured faster there on the
# regularisers' whole training steps (the tangent pass took 1.00-1.51x the official double backprop's
# time at batch 64, SmallCNN and ResNet-20, 2-core x86_64, torch 2.13:
# bench/results/cpu-2core-x86_64-2026-12-04-gradient-penalties.json). CUDA: the tangent pass, chosen
# from LFR's measurements, not yet from input_grad's own (double backprop cost 4.7 gradients per
# inner step on an H200, lfr_ext/linearized/README.md); scripts/gpu_check.sh measures it per
# regulariser (bench/bench_gradient_penalties.py). Other devices: double backprop.
AUTO_BY_DEVICE = {"cpu": "double_backprop", "cuda": "linearized"}

OutputsLoss = Callable[[torch.Tensor, object], torch.Tensor]


def _check(model, x, y, loss_fn, hvp, grad_scaler, return_outputs) -> None:
    check_model(model)
    if hvp not in INPUT_GRAD_METHODS:
        raise ValueError(f"input_grad's hvp must be one of {INPUT_GRAD_METHODS}, got {hvp!r}")
    check_grad_scaler(grad_scaler)
    check_data_parallel(model, "caller")
    if return_outputs and unwrapped(model) is not model:
        raise ValueError(
            "input_grad(return_outputs=True) on a DDP model: take the ordinary loss on a forward through the "
            "wrapper, which prepares the gradient all-reduce (input_grad's own forward runs on the module it holds)"
        )
    if sharded_modules(unwrapped(model)):
        raise NotImplementedError(
            "input_grad does not take FSDP2 (fully_shard) models yet: its second backward reads the unsharded "
            "parameters after FSDP's post-backward has resharded them (pytorch/pytorch#172543); "
            "lfr_ext.flatness_penalty and lfr_loss take them"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, y) -> (B,) losses, got {type(loss_fn).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape (B, ...), got a 0-dim tensor")
    if loss_fn is None:
        if not isinstance(y, torch.Tensor) or y.dtype not in LABEL_DTYPES or y.shape != (x.shape[0],):
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"the default cross-entropy needs y as class indices of shape ({x.shape[0]},) and an integer "
                f"dtype, got {got}; pass loss_fn=(outputs, y) -> (B,) losses for anything else"
            )
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")


def input_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    loss_fn: OutputsLoss | None = None,
    hvp: str = "auto",
    grad_scaler: torch.amp.GradScaler | None = None,
    return_outputs: bool = False,
):
    r"""``g = grad_x sum_i loss_fn(model(x), y)_i`` (B, ...) like ``x``, differentiable once more.

    ``g`` has the value and the derivatives (w.r.t. the parameters, and w.r.t. ``x`` when ``x``
    requires grad) that ``torch.autograd.grad(loss.sum(), x, create_graph=True)`` gives, so any
    penalty ``Phi(g)`` is added to the loss and backpropagated as usual. Several calls and
    ordinary losses compose into one ``backward()``.

    With ``hvp="linearized"`` the backward of ``Phi(g)`` is the gradient of ``l'(f)^T (J v)`` for
    ``v = dPhi/dg``: one tangent pass and one backward (:mod:`lfr_ext.hvp.tangent_backward`), exact.
    ``"double_backprop"`` builds ``g`` with ``create_graph=True``. ``"auto"`` (default) runs what
    :data:`AUTO_BY_DEVICE` says was measured faster on ``x``'s device (double backprop on the CPU,
    the tangent pass on CUDA). Where that is the tangent pass, it needs lfr_ext's tape to cover every
    op of the model (checked against autograd the first time, per model and module modes) and the
    output to be one tensor with the batch first; else double backprop, saying once why. The op
    classes ``lfr_ext.hvp.AUTO_DECLINED_CLASSES`` go to double backprop, as in LFR's engine.

    The forward is an ordinary ``model(x)`` in the modes the caller set: train-mode BatchNorm
    normalises with batch statistics and updates its running statistics, once per call, as your
    own forward would. On a DDP model it runs on the module the wrapper holds, with the buffers
    the wrapper's forward would broadcast (as LFR's penalty pass does, :mod:`lfr_ext.wrapped`);
    its gradients reach the same parameters, so the step's one backward all-reduces them, once
    the step has run its ordinary forward through the wrapper (which prepares that all-reduce;
    ``return_outputs`` is refused there for this reason). Before torch 2.13, run that forward
    first: DDP's forward broadcasts the buffers in place, which would invalidate a graph built
    before it. FSDP2 models are not taken yet.

    Args:
        model: any ``nn.Module``, DDP-wrapped or not.
        x: (B, ...) floating inputs. If ``x`` requires grad (an interpolate of generated images,
            say), ``g``'s backward reaches it, as double backprop's does.
        y: (B,) integer class indices for the default loss; anything ``loss_fn`` takes, or None.
        loss_fn: ``(outputs, y) -> (B,)`` per-sample losses (default: cross-entropy). A critic's
            score is ``lambda out, _: out.squeeze(-1)``. It must depend on ``x`` only through
            ``outputs``: the tangent pass does not see a closure over ``x``, and a ``y`` that
            requires grad is refused by ``"linearized"`` (``"auto"`` runs double backprop then).
        hvp: ``"auto"``, ``"linearized"`` (raises :class:`lfr_ext.linearized.UnsupportedOpError`
            naming what the tape does not cover) or ``"double_backprop"``.
        grad_scaler: an fp16 ``torch.amp.GradScaler``: the first-order backward runs on the
            scaled loss (PyTorch's gradient-penalty AMP recipe) and ``g`` is unscaled; backprop
            ``grad_scaler.scale(loss)`` as usual.
        return_outputs: also return ``model(x)`` from the same forward, to take the ordinary loss
            on without a second forward.

    Returns:
        ``g``, or ``(g, outputs)`` with ``return_outputs=True``.
    """
    _check(model, x, y, loss_fn, hvp, grad_scaler, return_outputs)
    loss_scale = input_gradient_scale(grad_scaler, x)
    # A DDP model: the pass runs on the module the wrapper holds, with the buffers the wrapper's
    # forward would broadcast, like LFR's penalty pass (lfr_ext.wrapped).
    sync_buffers_as_forward_would(model)
    model = unwrapped(model)
    if x.shape[0] == 0:
        return _double_backprop(model, x, y, loss_fn, loss_scale, return_outputs)
    if hvp == "auto" and AUTO_BY_DEVICE.get(x.device.type, "double_backprop") == "double_backprop":
        return _double_backprop(model, x, y, loss_fn, loss_scale, return_outputs)
    if isinstance(y, torch.Tensor) and y.requires_grad:
        # The identity v^T g = l'(f)^T J v holds for a loss that sees x only through f; a y that
        # requires grad (a reconstruction target y = x, say) adds its own path to g.
        if hvp == "linearized":
            raise ValueError(
                "input_grad(hvp='linearized') needs y not to require grad (the loss must depend on x only "
                "through model(x)); detach y or use hvp='double_backprop'"
            )
        return _double_backprop(model, x, y, loss_fn, loss_scale, return_outputs)
    with torch.enable_grad():
        # default_loss=True: the tangent pass takes any loss head (its derivative by autograd).
        # caller_depth: from the cache, the engine (2), _linearized and input_grad to the caller.
        engine = SecondOrderEngine(
            hvp, model, default_loss=True, loss_scale=loss_scale, device=x.device, caller_depth=6
        )
        if engine.method == "linearized":
            result = _linearized(engine, model, x, y, loss_fn, loss_scale)
            if result is not None:
                g, outputs = result
                return (g, outputs) if return_outputs else g
        return _double_backprop(model, x, y, loss_fn, loss_scale, return_outputs)


def _linearized(engine: SecondOrderEngine, model, x, y, loss_fn, loss_scale):
    """The tangent-pass ``(g, outputs)``, or None where ``auto`` falls back (the fallback is
    remembered and said once by the engine). The pass being verified (the first per model and
    modes) is where a refusal is expected: its buffers are put back then (the engine puts back the
    RNG), so the double-backprop redo updates the running statistics once and draws the same
    Dropout masks. A later pass refused midway (control flow that changes with the data) keeps
    what it did to the buffers and the RNG."""
    snapshots = []

    def run(verify: bool):
        if verify:
            snapshots.append(BufferSnapshot(engine.model))
        return input_grad_linearized(
            model, x, y, loss_fn, verify=verify, loss_scale=loss_scale, declined=engine.declined
        )

    try:
        result = engine.linearized_pass("input_grad", x, run)
    except UnsupportedOpError:
        for snapshot in snapshots:
            snapshot.restore(compare_values=True)
        raise
    if result is None:
        for snapshot in snapshots:
            snapshot.restore(compare_values=True)
        return None
    return result.value


def _double_backprop(model, x, y, loss_fn, loss_scale, return_outputs: bool):
    """``create_graph=True``: the second-order graph of the first backward."""
    with torch.enable_grad(), twice_differentiable_attention(model):
        source = x if x.requires_grad else x.detach().requires_grad_(True)
        outputs = model(source)
        losses = checked_losses(outputs, y, loss_fn, x.shape[0])
        (g,) = torch.autograd.grad(scaled(losses.sum(), loss_scale), source, create_graph=True)
        g = unscaled(g, loss_scale)
    return (g, outputs) if return_outputs else g


__all__ = ["AUTO_BY_DEVICE", "INPUT_GRAD_METHODS", "input_grad"]
