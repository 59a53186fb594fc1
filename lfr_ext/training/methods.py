"""The training objectives compared by the trainer, one function per method: LFR, the adversarial
baselines (PGD-AT, TRADES), plain training, and the input-gradient regularisers of
:mod:`lfr_ext.regularizers` (Gradient Norm, input-gradient regularisation, CURE, GradAlign, LLR).

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

from .. import regularizers
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


# CURE's official h = 3 and lambda = 4 are in normalised-input units (CIFAR-10 std about 0.2 per
# channel); the harness feeds pixels in [0, 1]. A step of h normalised units is h * std pixels, and
# a gradient w.r.t. normalised inputs is std times the pixel gradient, so the weight on the
# (unsquared) pixel-gradient penalty is lambda * std.
CURE_INPUT_STD = 0.2
CURE_H_PIXELS = 3.0 * CURE_INPUT_STD

# The gradient penalties' weights when TrainConfig.penalty_weight is None: each paper's official value.
PENALTY_DEFAULTS = {
    # adriarm/robustness_input_gradients configs_cifar/gradnorm_prn18_gelu.yaml: 0.8 CE + 1.2 penalty
    "gradnorm": 1.2,
    # dtak/adversarial-robustness-public: no CIFAR-10 value; its SVHN notebook's 1e4 (MNIST: 10^4.75)
    "igr": 1e4,
    # F-Salehi/CURE_robustness CURE/CURE.py: CURELearner(lambda_=4), in pixel units (above)
    "cure": 4.0 * CURE_INPUT_STD,
    # tml-epfl/understanding-fast-adv-training: lambda 0.2 at eps 8/255 (README, scripts)
    "gradalign": 0.2,
    # deepmind/local_linearity_regularizer config.py: local linearity weight 4 (smoothing 0.3, CE weight 2)
    "llr": 4.0,
}


def _penalty_weight(cfg: TrainConfig, method: str) -> float:
    return PENALTY_DEFAULTS[method] if cfg.penalty_weight is None else cfg.penalty_weight


def _from_regularizer(out: regularizers.RegularizedLoss) -> StepOutput:
    return StepOutput(out.loss, out.logits, out.penalty.detach())


def gradnorm_step(model, x, y, cfg: TrainConfig, grad_scaler=None, compiled: bool = False) -> StepOutput:
    """Rodriguez-Munoz et al. (2024): ``0.8 CE + w * eps * mean ||grad_x CE_b||_1`` at the clean x,
    in the trainer's train mode (the official step runs in eval mode, fine-tuning a pretrained
    model; its weight ramp is not applied). ``std=1``: the model's inputs are pixels."""
    out = regularizers.gradient_norm(
        model, x, y, eps=cfg.eps, std=1.0, penalty_weight=_penalty_weight(cfg, "gradnorm"), grad_scaler=grad_scaler
    )
    return _from_regularizer(out)


def igr_step(model, x, y, cfg: TrainConfig, grad_scaler=None, compiled: bool = False) -> StepOutput:
    """Ross & Doshi-Velez (2018): ``CE + w * ||grad_x CE||_2^2 / 2``."""
    out = regularizers.input_gradient_regularization(
        model, x, y, lam=_penalty_weight(cfg, "igr"), grad_scaler=grad_scaler
    )
    return _from_regularizer(out)


def cure_step(model, x, y, cfg: TrainConfig, grad_scaler=None, compiled: bool = False) -> StepOutput:
    """Moosavi-Dezfooli et al. (2019): ``CE + w * mean ||g(x + z) - g(x)||``."""
    out = regularizers.cure(model, x, y, h=CURE_H_PIXELS, lam=_penalty_weight(cfg, "cure"), grad_scaler=grad_scaler)
    return _from_regularizer(out)


def gradalign_step(model, x, y, cfg: TrainConfig, grad_scaler=None, compiled: bool = False) -> StepOutput:
    """Andriushchenko & Flammarion (2020): FGSM-AT at ``eps`` + ``w * (1 - cos)``."""
    out = regularizers.gradalign(
        model, x, y, eps=cfg.eps, lam=_penalty_weight(cfg, "gradalign"), grad_scaler=grad_scaler
    )
    return _from_regularizer(out)


def llr_step(model, x, y, cfg: TrainConfig, grad_scaler=None, compiled: bool = False) -> StepOutput:
    """Qin et al. (2019): ``2 CE + w * gamma``, gamma at the gap-maximising point of ``cfg.steps``
    Adam steps (the harness's inner-step budget; officially 10) in the eps-ball; weight decay is the
    optimiser's (``--weight-decay``), the official eps ramp is not applied."""
    out = regularizers.llr(
        model, x, y, eps=cfg.eps, lam=_penalty_weight(cfg, "llr"), steps=cfg.steps, grad_scaler=grad_scaler
    )
    return _from_regularizer(out)


METHOD_STEPS = {
    "lfr": lfr_step,
    "pgd_at": pgd_at_step,
    "trades": trades_step,
    "plain": plain_step,
    "gradnorm": gradnorm_step,
    "igr": igr_step,
    "cure": cure_step,
    "gradalign": gradalign_step,
    "llr": llr_step,
}
# The methods whose loss is differentiated twice (torch.compile of the model does not support it).
SECOND_ORDER_METHODS = ("lfr", *PENALTY_DEFAULTS)
