r"""The field's input-gradient regularisers, each a small function on :func:`lfr_ext.input_grad`.

Each returns :class:`RegularizedLoss` ``(loss, data_loss, penalty, logits)``: the scalar training
loss exactly as the method's official code builds it, its data term, the unweighted penalty (what
the method's weight multiplies) and the logits of the data term's forward (for accuracy). Backprop
``loss``; the penalty's second-order backward runs on lfr_ext's engine (``hvp=``, as for
:func:`lfr_ext.input_grad`). Notation: ``g_b = grad_x l_b`` the per-sample input gradient of the
cross-entropy, ``B`` the batch size, norms over one sample.

==================  ==========================================================================
function            loss (official code it is checked against, tests/official_penalties.py)
==================  ==========================================================================
gradient_norm       ``w_ce CE + w_p alpha (eps/std) mean_b ||g_b||_1`` (Rodriguez-Munoz et al.,
                    ECCV 2024; adriarm/robustness_input_gradients ``input_norm_losses.py``)
input_gradient_     ``CE + lam sum_b ||g_b||_2^2 / (2 B^2)``, or ``CE + lam mean_b ||g_b||_1``
regularization      (Ross & Doshi-Velez, AAAI 2018; dtak/adversarial-robustness-public
                    ``neural_network.py``)
cure                ``CE + lam mean_b ||g_b(x + z) - g_b(x)||_2``, ``z = h sign(g) / sqrt(D)``,
                    the penalty's passes in eval mode (Moosavi-Dezfooli et al., CVPR 2019;
                    F-Salehi/CURE_robustness ``CURE/CURE.py``)
gradalign           FGSM-AT ``CE(x + delta) + lam (1 - mean_b cos(g_b(x), g_b(x + eta)))``, the
                    first gradient detached (Andriushchenko & Flammarion, NeurIPS 2020;
                    tml-epfl/understanding-fast-adv-training ``train.py``)
llr                 ``2 CE + lam mean_b (|l_b(x + d) - l_b(x) - d_b^T g_b| + 0.3 |d_b^T g_b|)`` at
                    the gap-maximising ``d`` (Qin et al., NeurIPS 2019;
                    deepmind/local_linearity_regularizer ``regularizers.py``)
jacobian_           ``CE + lam/2 * C/(n B) sum_i ||J^T v_i||^2`` with unit random ``v_i``
regularization      (Hoffman, Roberts, Yaida 2019; facebookresearch/jacobian_regularizer
                    ``jacobian/jacobian.py``)
==================  ==========================================================================

The GAN penalties need no function of their own: WGAN-GP is
``((lfr_ext.input_grad(D, x_hat, loss_fn=score).flatten(1).norm(dim=1) - 1) ** 2).mean()`` and R1
``lfr_ext.input_grad(D, x_real, loss_fn=score).square().flatten(1).sum(1).mean()`` with
``score = lambda out, _: out.squeeze(-1)`` (README, "Gradient penalties").

Modes are the caller's (``model.train()`` for a training step), except where the official code
switches them inside the step (CURE's penalty runs in eval mode); those switches are undone
before returning. On a DDP model the data term's forward goes through the wrapper (it prepares
the gradient all-reduce) and each input gradient runs on the module it holds.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._state import frozen_running_stats, module_modes, restore_modes, set_eval
from .input_gradients import input_grad
from .wrapped import unwrapped


class RegularizedLoss(NamedTuple):
    """``loss = data_loss + weight * penalty`` (scalars, as each function documents) and the
    ``logits`` (B, C) of the data term's forward."""

    loss: torch.Tensor
    data_loss: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _gradient_and_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **engine):
    """``(g, logits)`` at ``x`` from one forward where the model allows (a DDP model: the logits
    from the wrapper's forward, which prepares the all-reduce, then ``g`` on the held module)."""
    if unwrapped(model) is not model:
        logits = model(x)
        return _second_forward_input_grad(model, x, y, **engine), logits
    return input_grad(model, x, y, return_outputs=True, **engine)


def _second_forward_input_grad(model: nn.Module, x: torch.Tensor, y, **engine) -> torch.Tensor:
    """``input_grad`` on a forward the official code does not make (it shares one forward): the
    running statistics are not moved a second time."""
    with frozen_running_stats(unwrapped(model)):
        return input_grad(model, x, y, **engine)


def gradient_norm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 4 / 255,
    std: float = 0.225,
    ce_weight: float = 0.8,
    penalty_weight: float = 1.2,
    alpha: float = 1.0,
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""Gradient Norm: ``ce_weight * CE + penalty_weight * alpha * P``,
    ``P = (eps / std) * mean_b ||g_b||_1`` at the clean ``x`` (LFR's penalty with no inner steps).

    Defaults: adriarm/robustness_input_gradients' CIFAR-10 configuration
    (``configs_cifar/gradnorm_prn18_gelu.yaml``: weights 0.8 and 1.2, ``alpha`` ramped from 0 to 1
    over the first 5 epochs by the caller) and the ``DBP`` loss's ``eps = 4/255`` and
    ``std = 0.225`` (``input_norm_losses.py``). The official step runs in eval mode (the caller's
    choice here). ``CE`` is the batch mean; ``x`` (B, ...), ``y`` (B,).
    """
    g, logits = _gradient_and_logits(model, x, y, hvp=hvp, grad_scaler=grad_scaler)
    data_loss = F.cross_entropy(logits, y)
    penalty = (eps / std) * _per_sample(g).abs().sum(1).mean()
    return RegularizedLoss(ce_weight * data_loss + penalty_weight * alpha * penalty, data_loss, penalty, logits)


def input_gradient_regularization(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    norm: str = "l2",
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""Input-gradient regularisation ("double backprop"): ``CE + lam * P`` with, for the gradient
    of the batch-mean cross-entropy ``G = g / B``,

    * ``norm="l2"``: ``P = ||G||_2^2 / 2 = sum_b ||g_b||^2 / (2 B^2)`` (TensorFlow's ``l2_loss``);
    * ``norm="l1"``: ``P = ||G||_1 = mean_b ||g_b||_1``.

    As dtak/adversarial-robustness-public ``neural_network.py`` (``l2_double_backprop``,
    ``l1_double_backprop``). ``lam`` has no CIFAR-10 value there (MNIST: 10^4.75, SVHN: 10^4);
    note that ``P`` scales with ``1/B``, so ``lam`` goes with the batch size.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    g, logits = _gradient_and_logits(model, x, y, hvp=hvp, grad_scaler=grad_scaler)
    data_loss = F.cross_entropy(logits, y)
    batch = x.shape[0]
    if norm == "l2":
        penalty = g.square().sum() / (2 * batch * batch)
    else:
        penalty = g.abs().sum() / batch
    return RegularizedLoss(data_loss + lam * penalty, data_loss, penalty, logits)


def cure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float = 3.0,
    lam: float = 4.0,
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""CURE: ``CE + lam * mean_b ||g_b(x + z) - g_b(x)||_2`` with ``z = h (s + 1e-7) / (||s|| + 1e-7)``,
    ``s = sign(g(x))`` per sample (detached): a finite difference of the input gradient along the
    sign direction, whose norm measures curvature.

    As F-Salehi/CURE_robustness ``CURE/CURE.py`` (``_find_z``, ``regularizer``; defaults
    ``lambda_ = 4``, ``h = 3``, in the units of the model's input: the official code feeds
    normalised images). The data term's forward runs in the caller's mode, the penalty's two
    passes in eval mode (as officially; the modes are put back). The norm is not squared. The
    official code takes ``g(x)`` twice (once for ``z``, once in the penalty); here once.
    """
    modes = module_modes(unwrapped(model))
    logits = model(x)
    data_loss = F.cross_entropy(logits, y)
    try:
        set_eval(unwrapped(model))
        g_clean = input_grad(model, x, y, hvp=hvp, grad_scaler=grad_scaler)
        direction = g_clean.detach().sign() + 1e-7
        norms = _per_sample(g_clean.detach().sign()).norm(dim=1) + 1e-7
        z = h * direction / norms.view(-1, *([1] * (x.dim() - 1)))
        g_far = input_grad(model, x + z, y, hvp=hvp, grad_scaler=grad_scaler)
    finally:
        restore_modes(modes)
    penalty = _per_sample(g_far - g_clean).norm(dim=1).mean()
    return RegularizedLoss(data_loss + lam * penalty, data_loss, penalty, logits)


def _official_box_clamp(z: torch.Tensor) -> torch.Tensor:
    """``clamp(z, 0, 1)`` whose gradient passes where ``0 < z <= 1``: GradAlign's official
    ``torch.max(torch.min(z, 1), 0)`` under torch 1.4 (its Dockerfile's version), whose ``min``
    passes the gradient at ``z == 1`` and whose ``max`` does not at ``z == 0``."""
    passes = (z > 0) & (z <= 1)
    return torch.where(passes, z, z.detach().clamp(0.0, 1.0))


def gradalign(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    lam: float = 0.2,
    fgsm_alpha: float = 1.25,
    eta: torch.Tensor | None = None,
    delta_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""GradAlign with FGSM training: ``CE(x + delta) + lam * (1 - mean_b cos(g_b(x), g_b(x + eta)))``.

    As tml-epfl/understanding-fast-adv-training ``train.py``: the FGSM step
    ``delta = clip_eps(delta0 + fgsm_alpha * eps * sign(g(clip(x + delta0))))`` (then into the box),
    the first gradient detached, the second at ``x + eta`` with ``eta ~ U[-eps, eps]`` (not
    clipped) differentiated through; samples where either gradient is zero are left out of the
    mean (with none left, the penalty is 1 with zero gradient, where the official mean is NaN).
    Defaults: ``lam = 0.2`` (the repository's value at ``eps = 8/255``; its rule is
    ``lam = 0.02 * 10 ** (eps_px / 8)`` for other radii, eps_px in 1/255 units),
    ``fgsm_alpha = 1.25``, ``delta0 = 0`` (``delta_init``). ``eta`` is drawn from ``generator``
    (default: the global RNG) unless given. ``x`` in ``[0, 1]``. The FGSM gradient passes the box
    as the official ``utils.clamp`` did under its torch 1.4: not at a pixel exactly at 0, so FGSM
    leaves saturated-black pixels (``torch.clamp`` would pass it there).
    """
    delta = torch.zeros_like(x) if delta_init is None else delta_init.detach().clone()
    delta.requires_grad_(True)
    with torch.enable_grad():
        first = F.cross_entropy(model(_official_box_clamp(x + delta)), y)
        (g_first,) = torch.autograd.grad(first, delta)
    with torch.no_grad():
        delta = (delta + fgsm_alpha * eps * g_first.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0.0, 1.0) - x
    logits = model(x + delta)
    data_loss = F.cross_entropy(logits, y)
    if lam == 0:
        return RegularizedLoss(data_loss, data_loss, torch.zeros_like(data_loss), logits)
    if eta is None:
        device = x.device if generator is None else generator.device
        eta = torch.empty(x.shape, dtype=x.dtype, device=device).uniform_(-eps, eps, generator=generator).to(x.device)
    g_near = input_grad(model, x + eta, y, hvp=hvp, grad_scaler=grad_scaler)
    first_norms, near_norms = _per_sample(g_first).norm(dim=1), _per_sample(g_near).norm(dim=1)
    kept = (first_norms != 0) & (near_norms != 0)
    # cos over the kept samples, without a host sync (no boolean indexing): a dropped sample adds 0.
    cosines = (_per_sample(g_first) * _per_sample(g_near)).sum(1) / torch.where(kept, first_norms * near_norms, 1.0)
    # No sample kept (zero gradients, a zero-initialised head): the official mean of nothing is NaN;
    # here the penalty is 1 with zero gradient, so that the step goes on.
    penalty = 1.0 - torch.where(kept, cosines, 0.0).sum() / kept.sum().clamp_min(1)
    return RegularizedLoss(data_loss + lam * penalty, data_loss, penalty, logits)


class _CleanBatchStatistics:
    """LLR's normalisation (deepmind/local_linearity_regularizer ``batchnorm.py``, ``test_local_stats``):
    every BatchNorm of the regulariser's passes normalises with the CLEAN batch's statistics and
    updates nothing.

    :meth:`recording`: a forward in which each BatchNorm normalises with its own input's batch
    statistics (without updating its running ones) and its input is kept. :meth:`applied`: forwards
    in which each BatchNorm normalises with the kept inputs' biased mean and variance (with their
    graph unless ``detached``), its running statistics untouched."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.statistics: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def recording(self):
        def keep(module, args):
            self.inputs[module] = args[0]

        handles = [m.register_forward_pre_hook(keep) for m in self.norms]
        modes = [(m, m.training, m.track_running_stats) for m in self.norms]
        for m in self.norms:
            m.train()
            m.track_running_stats = False  # batch statistics, no update (as frozen_running_stats)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training, tracked in modes:
                m.train(training)
                m.track_running_stats = tracked
        for m, inputs in self.inputs.items():
            dims = [0, *range(2, inputs.dim())]
            self.statistics[m] = (inputs.mean(dims), inputs.var(dims, unbiased=False))

    @contextlib.contextmanager
    def applied(self, detached: bool):
        def normalised(module, args, _output):
            mean, var = self.statistics[module]
            if detached:
                mean, var = mean.detach(), var.detach()
            shape = (1, -1) + (1,) * (args[0].dim() - 2)
            scale = torch.rsqrt(var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            out = (args[0] - mean.view(shape)) * scale.view(shape)
            return out if module.bias is None else out + module.bias.view(shape)

        # The module's own forward runs in eval mode (no update) and its output is replaced.
        modes = [(m, m.training) for m in self.norms]
        handles = [m.register_forward_hook(normalised) for m in self.norms]
        for m in self.norms:
            m.eval()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training in modes:
                m.train(training)


def llr(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    lam: float = 4.0,
    smoothing: float = 0.3,
    ce_weight: float = 2.0,
    weight_decay: float = 0.0,
    steps: int = 10,
    adam_lr: float = 0.1,
    delta_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""Local linearity regularisation (Qin et al., NeurIPS 2019):
    ``ce_weight * CE + weight_decay * sum ||W||^2 / 2 + lam * gamma``, with

    .. math::
        \gamma = \mathrm{mean}_b\, |l_b(x + \delta) - l_b(x) - \delta_b^\top g_b|
                 + \mathrm{smoothing}\, |\delta_b^\top g_b|

    at the ``delta`` that ``steps`` unrolled Adam steps (lr ``adam_lr``) find to maximise the gap,
    projected on the eps-ball and the ``[0, 1]`` box, from ``delta_init`` (default: ``U[-eps, eps]``
    from ``generator``). ``delta`` is a constant of the loss; ``g`` and both losses keep their
    graphs. The regulariser's forwards normalise with the clean batch's statistics and update no
    running statistics; the data term's forward is the caller's.

    As deepmind/local_linearity_regularizer ``regularizers.py`` (``local_linearity``), ``config.py``
    (``lam = 4``, ``smoothing = 0.3``, CE weight 2, 10 steps of Adam at 0.1, ``eps = 8/255`` ramped
    over the first 500 steps by the caller, weight decay 2e-4 on conv and linear kernels: pass it
    here, or give the optimiser its own). ``gamma`` is the returned ``penalty``.
    """
    logits = model(x)
    data_loss = F.cross_entropy(logits, y)
    net = unwrapped(model)
    norms = _CleanBatchStatistics(net)
    with norms.recording():
        g, clean_logits = input_grad(net, x, y, hvp=hvp, grad_scaler=grad_scaler, return_outputs=True)
    clean_losses = F.cross_entropy(clean_logits, y, reduction="none")
    if delta_init is None:
        device = x.device if generator is None else generator.device
        delta_init = torch.empty(x.shape, dtype=x.dtype, device=device).uniform_(-eps, eps, generator=generator)
    delta = _project(delta_init.to(x.device), x, eps)

    def gap(point: torch.Tensor, gradient: torch.Tensor, nominal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample ``|l(point) - l(x) - d^T g|`` and ``d^T g``, ``d = point - x`` constant."""
        moved = _per_sample((point - x).detach() * gradient).sum(1)
        return (F.cross_entropy(net(point), y, reduction="none") - nominal - moved).abs(), moved

    with norms.applied(detached=True), torch.enable_grad():
        first, second = torch.zeros_like(delta), torch.zeros_like(delta)
        for t in range(1, steps + 1):  # Adam on -mean(gap), from zero moments, bias-corrected
            leaf = delta.detach().requires_grad_(True)
            gaps, _ = gap(x + leaf, g.detach(), clean_losses.detach())
            (ascent,) = torch.autograd.grad(-gaps.mean(), leaf)
            with torch.no_grad():
                first = 0.9 * first + 0.1 * ascent
                second = 0.999 * second + 0.001 * ascent * ascent
                step = adam_lr * (first / (1 - 0.9**t)) / ((second / (1 - 0.999**t)).sqrt() + 1e-9)
                delta = _project(leaf - step, x, eps)
    with norms.applied(detached=False):
        gaps, moved = gap((x + delta).detach(), g, clean_losses)
    penalty = (gaps + smoothing * moved.abs()).mean()
    loss = ce_weight * data_loss + lam * penalty
    if weight_decay:
        kernels = [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        loss = loss + weight_decay * sum(w.square().sum() for w in kernels if w.requires_grad) / 2
    return RegularizedLoss(loss, data_loss, penalty, logits)


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``delta`` into the eps-ball, then ``x + delta`` into the ``[0, 1]`` box."""
    return (x + delta.clamp(-eps, eps)).clamp(0.0, 1.0) - x


def jacobian_regularization(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    projections: int = 1,
    v: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    grad_scaler=None,
) -> RegularizedLoss:
    r"""Jacobian regularisation: ``CE + lam * R``, ``R = 1/2 * C / (n B) * sum_i ||J^T u_i||^2``, an
    unbiased estimate of ``||J||_F^2 / (2B)`` for the Jacobian ``J`` of the logits (B, C) in ``x``,
    from ``n = projections`` random unit vectors ``u_i`` per sample.

    As facebookresearch/jacobian_regularizer ``jacobian/jacobian.py`` (``JacobianReg``): ``u_i``
    are standard normal draws ``v`` (n, B, C) normalised per sample (drawn from ``generator``
    unless given). ``J^T u`` is the input gradient of the "loss" ``u^T z``
    (:func:`lfr_ext.input_grad` with that ``loss_fn``). The repository's examples use
    ``lam = 0.01``; it has no CIFAR-10 value.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    engine = dict(hvp=hvp, grad_scaler=grad_scaler)
    total, logits = 0.0, None
    for index in range(projections):
        loss_fn = _unit_projection(v[index] if v is not None else None, generator)
        if index == 0 and unwrapped(model) is model:  # the data term on the same forward
            jtu, logits = input_grad(model, x, loss_fn=loss_fn, return_outputs=True, **engine)
        else:  # the official code projects one forward's outputs: the running statistics move once
            if index == 0:  # a DDP model: the data term's forward through the wrapper
                logits = model(x)
            jtu = _second_forward_input_grad(model, x, None, loss_fn=loss_fn, **engine)
        total = total + jtu.square().sum()
    penalty = 0.5 * logits.shape[-1] * total / (projections * x.shape[0])
    data_loss = F.cross_entropy(logits, y)
    return RegularizedLoss(data_loss + lam * penalty, data_loss, penalty, logits)


def _unit_projection(draw: torch.Tensor | None, generator: torch.Generator | None):
    """The loss ``u^T z`` (per sample) for one unit vector ``u`` per sample: ``draw`` (B, C)
    normalised, or a standard normal draw made at the first call, when the class count is known
    (and reused if the pass is redone)."""
    unit: list[torch.Tensor] = []

    def projected(outputs: torch.Tensor, _y) -> torch.Tensor:
        if not unit:
            chosen = draw
            if chosen is None:
                device = outputs.device if generator is None else generator.device
                chosen = torch.randn(outputs.shape, dtype=outputs.dtype, device=device, generator=generator)
            unit.append(chosen.to(outputs) / chosen.to(outputs).norm(dim=1, keepdim=True))
        return (outputs * unit[0]).sum(-1)

    return projected


__all__ = [
    "RegularizedLoss",
    "cure",
    "gradalign",
    "gradient_norm",
    "input_gradient_regularization",
    "jacobian_regularization",
    "llr",
]
