"""The four training objectives compared by the trainer, one function per method.

Each method maps a batch to a :class:`StepOutput`; the trainer does the optimizer step (and
the autocast around the method, and the backward through ``grad_scaler`` in fp16). With
``compiled`` LFR uses the compiled engine (``hvp="compiled"``); the trainer compiles the other
methods' model itself. All
inner maximisations run with the model in eval mode (Dropout off, BatchNorm on running
statistics), as in the authors' LFR code and the TRADES code it builds on; the loss is then
taken in train mode.

The attacks here are *training* attacks (part of PGD-AT and TRADES by definition). Evaluation
never uses them: :mod:`lfr_ext.evaluation` attacks with torchattacks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hvp.scaling import input_gradient_scale, scaled
from ..penalty import lfr_loss
from ..reference import project_linf
from ..wrapped import sync_buffers_as_forward_would, unwrapped
from .config import TrainConfig


class StepOutput(NamedTuple):
    """``loss``: scalar to minimise. ``logits`` (B, C): the model's outputs on the inputs the
    loss is taken on (clean for lfr/trades/plain, adversarial for pgd_at), for the running
    accuracy. ``penalty``: the method's regulariser (LFR penalty, TRADES KL), NaN if none."""

    loss: torch.Tensor
    logits: torch.Tensor
    penalty: torch.Tensor


def pgd_linf_ce(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    loss_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Madry et al.'s L-inf PGD on the cross-entropy from a uniform random start: (B, ...) in
    [0, 1]. The model's mode is the caller's business. ``generator`` fixes the start; it may
    live on another device than ``x`` (a CPU generator gives the same start on every device).
    ``loss_scale`` (fp16): the input gradient is taken on the scaled loss, against underflow;
    only its sign is used, so it needs no unscaling."""
    noise_device = x.device if generator is None else generator.device
    delta = (
        torch.empty(x.shape, dtype=x.dtype, device=noise_device).uniform_(-eps, eps, generator=generator).to(x.device)
    )
    x_adv = (x + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(scaled(loss, loss_scale), x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def trades_attack(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRADES's inner maximisation: PGD on KL(f(x) || f(x')) from x + 0.001 * N(0, I);
    ``loss_scale`` as in :func:`pgd_linf_ce`."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(scaled(kl, loss_scale), x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def _nan(x: torch.Tensor) -> torch.Tensor:
    return x.new_full((), float("nan"))


def plain_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, grad_scaler=None, compiled: bool = False
) -> StepOutput:
    """Standard training: mean CE on clean inputs."""
    logits = model(x)
    return StepOutput(F.cross_entropy(logits, y), logits, _nan(x))


def pgd_at_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, grad_scaler=None, compiled: bool = False
) -> StepOutput:
    """Madry et al. (2018): mean CE on PGD adversarial examples only. The attack runs on the
    module a DDP wrapper holds (no gradient synchronisation needed) with the buffers the wrapper's
    forward would use, the loss through ``model``."""
    sync_buffers_as_forward_would(model)
    model.eval()
    x_adv = pgd_linf_ce(
        unwrapped(model),
        x,
        y,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        loss_scale=input_gradient_scale(grad_scaler, x),
    )
    model.train()
    logits = model(x_adv)
    return StepOutput(F.cross_entropy(logits, y), logits, _nan(x))


def trades_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, grad_scaler=None, compiled: bool = False
) -> StepOutput:
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x')) / B.

    The attack runs on the module a DDP wrapper holds, with the buffers the wrapper's forward
    would use. The clean forward goes through ``model`` (it prepares DDP's gradient reduction);
    the adversarial one runs on the held module, like LFR's penalty pass: its graph reaches the
    same parameters, so one all-reduce still follows the backward. A second forward through the
    wrapper would broadcast the buffers again, in place, after the first had saved them for its
    backward, which DDP before torch 2.13 does without a version-counter guard (autograd then
    refuses the backward). Rank 0's buffers, the ones DDP keeps, are the same either way."""
    sync_buffers_as_forward_would(model)
    model.eval()
    net = unwrapped(model)
    x_adv = trades_attack(
        net, x, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, loss_scale=input_gradient_scale(grad_scaler, x)
    )
    model.train()
    logits = model(x)
    kl = F.kl_div(F.log_softmax(net(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return StepOutput(F.cross_entropy(logits, y) + cfg.trades_beta * kl, logits, kl.detach())


def lfr_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, grad_scaler=None, compiled: bool = False
) -> StepOutput:
    """Xu et al. (2020): mean CE + lam * local-flatness penalty, via :func:`lfr_ext.lfr_loss`
    (which takes a DDP-wrapped model)."""
    # validate=False: the trainer checks the data once (validation would sync every step).
    out = lfr_loss(
        model,
        x,
        y,
        lam=cfg.lam,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        validate=False,
        grad_scaler=grad_scaler,
        hvp="compiled" if compiled else "auto",
    )
    return StepOutput(out.loss, out.logits, out.penalty.detach())


METHOD_STEPS = {"lfr": lfr_step, "pgd_at": pgd_at_step, "trades": trades_step, "plain": plain_step}
