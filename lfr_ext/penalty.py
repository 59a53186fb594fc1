r"""Public API: the LFR penalty, the authors' total loss, and the local-flatness metric.

Mode and state policy (the same for every function here):

* The inner ascent runs with every module in eval mode (the authors' ``model.eval()``), so
  BatchNorm uses running statistics and Dropout is off.
* The penalty pass of :func:`flatness_penalty` / :func:`lfr_loss` runs in the mode the caller
  left each module in (``penalty_mode="caller"``, the authors' choice: train-mode BatchNorm
  normalises with batch statistics), or fully in eval mode (``penalty_mode="eval"``).
* No pass of lfr_ext updates running statistics: train-mode BatchNorm uses batch statistics
  without writing ``running_mean`` / ``running_var`` / ``num_batches_tracked``. The one
  exception is the clean forward of :func:`lfr_loss`, which is an ordinary ``model(x)`` and
  updates them exactly as your own training forward would.
* After any call, also one that raised, every module's ``training`` flag and every buffer are
  as before; parameters, their ``requires_grad`` and ``.grad``, and ``x`` / ``y`` are never
  written. Only ``backward()`` of the returned tensor writes ``.grad``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator, NamedTuple

import torch
from torch import nn

from . import ops
from ._state import frozen_running_stats, module_modes, preserved_state, restore_modes, set_eval
from ._validation import (
    check_attack_args,
    check_grad_scaler,
    check_lam,
    check_model,
    check_model_and_data,
    check_penalty_mode,
    check_reduction,
    normalize_q,
)
from .hvp import HVP_METHODS, SecondOrderEngine
from .hvp.scaling import input_gradient_scale
from .reference import (
    LossFn,
    default_loss,
    flatness_ascent_reference,
    grad_norm_reference,
    input_gradient,
)
from .wrapped import check_data_parallel, sharded_step, sync_buffers_as_forward_would, unwrapped


class LFRLoss(NamedTuple):
    """Output of :func:`lfr_loss`: ``loss = natural_loss + lam * penalty`` (scalars) and the
    clean ``logits`` (B, C), for accuracy logging."""

    loss: torch.Tensor
    natural_loss: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor


class _Config(NamedTuple):
    eps: float
    step_size: float
    steps: int
    q: float
    loss_fn: LossFn
    init_std: float
    clip: tuple[float, float]
    generator: torch.Generator | None
    hvp: SecondOrderEngine
    impl: str
    loss_scale: torch.Tensor | None  # GradScaler's current scale (fp16 mixed precision), or None


def _configure(
    model,
    x,
    y,
    *,
    eps,
    step_size,
    steps,
    q,
    loss_fn,
    init_std,
    clip,
    generator,
    hvp,
    impl,
    validate,
    penalty_mode=None,
    grad_scaler=None,
):
    """Check every argument (before any work) and resolve the implementation choices. ``model``
    may be DDP-wrapped; the engine is planned for the module it wraps (see :mod:`lfr_ext.wrapped`)."""
    q = normalize_q(q)
    eps, step_size, steps, init_std, clip = check_attack_args(
        eps=eps, step_size=step_size, steps=steps, init_std=init_std, clip=clip
    )
    check_model(model)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, y) -> (B,) losses, got {type(loss_fn).__name__}")
    check_data_parallel(model, penalty_mode)
    if validate:
        check_model_and_data(model, x, y, clip, default_loss=loss_fn is None, generator=generator)
    chosen_impl = ops.resolve_impl(impl, x.device, x.dtype)
    # The double-backprop paths take per-sample norms with the fused, twice-differentiable op.
    norm_fn = grad_norm_reference if chosen_impl == "reference" else functools.partial(ops.grad_norm, impl=chosen_impl)
    loss_scale = input_gradient_scale(check_grad_scaler(grad_scaler), x)
    engine = SecondOrderEngine(
        hvp, unwrapped(model), default_loss=loss_fn is None, norm_fn=norm_fn, loss_scale=loss_scale, device=x.device
    )  # checks hvp against its method's record
    return _Config(
        eps, step_size, steps, q, loss_fn or default_loss, init_std, clip, generator, engine, chosen_impl, loss_scale
    )


def _ascend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: _Config):
    """Steps 1-2 with the chosen implementations; model modes are the caller's business.

    Returns ``(x', path_norms, finite)``. ``finite`` is None without a loss scale; with one (fp16)
    it is a 0-dim bool tensor, True when every inner gradient and HVP was finite: GradScaler sees
    only parameter gradients, so an overflow inside the ascent would otherwise go unnoticed.
    """
    track_x = x.requires_grad and torch.is_grad_enabled()
    impl = "reference" if track_x else cfg.impl  # only the eager chain carries d x'/d x
    finite = None if cfg.loss_scale is None else torch.ones((), dtype=torch.bool, device=x.device)

    def step(x_, x_adv, h, g, eps, step_size, lo, hi, q):
        return ops.ascent_step(x_, x_adv, h, g, eps=eps, step_size=step_size, lo=lo, hi=hi, q=q, impl=impl)

    def grad_and_hvp(*args):
        nonlocal finite
        g, h = cfg.hvp.grad_and_hvp(*args)
        if finite is not None:
            finite = finite & g.isfinite().all() & h.isfinite().all()
        return g, h

    x_adv, path_norms = flatness_ascent_reference(
        model,
        x if track_x else x.detach(),
        y,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        q=cfg.q,
        loss_fn=cfg.loss_fn,
        init_std=cfg.init_std,
        clip=cfg.clip,
        generator=cfg.generator,
        ascent_step=step,
        grad_and_hvp=grad_and_hvp,
    )
    return x_adv, path_norms, finite


class _Ascended(NamedTuple):
    net: nn.Module  # the module a DDP/FSDP wrapper holds, on which every pass runs
    step: object  # the FSDP2 step (lfr_ext.wrapped.sharded_step), a no-op otherwise
    modes: list  # the caller's module modes, for the penalty pass
    x_adv: torch.Tensor  # (B, ...) the ascended point
    path_norms: torch.Tensor  # (K, B) ||g||_q at the iterates
    finite: torch.Tensor | None  # see _ascend


@contextlib.contextmanager
def _ascended(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: _Config, *, close_at_exit: bool = False
) -> Iterator[_Ascended]:
    """The start every public function shares: give a DDP model's module the buffers the
    wrapper's forward would, open the step on the module a wrapper holds, then run the ascent in
    eval mode with every mode and buffer given back afterwards.
    ``close_at_exit``: no backward will follow (the FSDP2 step closes when the block ends)."""
    sync_buffers_as_forward_would(model)
    net = unwrapped(model)
    with sharded_step(net) as step:
        if close_at_exit:
            step.close_at_exit()
        with preserved_state(net):
            modes = module_modes(net)
            set_eval(net)
            x_adv, path_norms, finite = _ascend(net, x, y, cfg)
        yield _Ascended(net, step, modes, x_adv, path_norms, finite)


class _GradientsNaNUnless(torch.autograd.Function):
    """The identity, whose backward is NaN when ``finite`` is False."""

    @staticmethod
    def forward(ctx, value, finite):
        ctx.save_for_backward(finite)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (finite,) = ctx.saved_tensors
        return grad * torch.where(finite, 1.0, float("nan")).to(grad.dtype), None


def _poisoned_if_overflowed(penalty: torch.Tensor, finite: torch.Tensor | None) -> torch.Tensor:
    """The penalty, whose parameter gradients are NaN when the ascent overflowed: the scaled
    backward then finds non-finite gradients, and GradScaler skips the step and lowers the
    scale, as for any overflow. The value is left as computed (so the epoch's running loss is
    not NaN). Device-side: no host sync."""
    if finite is None:
        return penalty
    return _GradientsNaNUnless.apply(penalty, finite)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _empty_penalty(model: nn.Module, x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Zero penalty for an empty batch, still attached to the trainable parameters so that
    ``backward()`` runs (and writes zero gradients) like for any other batch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    zero = x.new_zeros(()) if trainable else x.new_zeros((), requires_grad=True)
    for p in trainable:
        zero = zero + p.reshape(-1)[:0].sum().to(x.dtype)
    return zero.expand(0) if reduction == "none" else zero


def _penalty_pass(model, x_adv, y, cfg: _Config, penalty_mode: str, modes, reduction: str) -> torch.Tensor:
    """Step 3 in the requested mode, without touching running statistics: (B,)."""
    if penalty_mode == "caller":
        restore_modes(modes)
    else:
        set_eval(model)
    with frozen_running_stats(model):
        return cfg.hvp.penalty(model, x_adv, y, cfg.loss_fn, cfg.q, reduction)


def flatness_penalty(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    q: float | str = 1,
    loss_fn: LossFn | None = None,
    init_std: float = 1e-3,
    clip: tuple[float, float] = (0.0, 1.0),
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    penalty_mode: str = "caller",
    hvp: str = "auto",
    impl: str | None = None,
    validate: bool = True,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    r"""The LFR penalty: the input-gradient norm at the flattest-hostile point near ``x``.

    .. math::
        x' \approx \arg\max_{x' \in B_\infty(x, \epsilon) \cap [lo, hi]} \|\nabla_{x'} l(f(x'), y)\|_q,
        \qquad P = \mathrm{mean}_i \|\nabla_{x'} l(f(x'_i), y_i)\|_q

    ``x'`` comes from ``steps`` projected sign-ascent steps on ``sum_i ||g_i||_q`` started at
    ``clip(x + init_std * N(0, I))`` (see :mod:`lfr_ext.reference`). ``P`` is differentiable
    w.r.t. the parameters (and w.r.t. ``x`` through the projection, if ``x`` requires grad).

    Args:
        model: any ``nn.Module`` mapping ``x`` to logits (B, C) (or whatever ``loss_fn`` takes).
        x: (B, ...) floating inputs inside ``clip``; y: (B,) int64 labels for the default loss.
        eps: L-inf radius; step_size: ascent step; steps: number of ascent steps (>= 0).
        q: gradient norm, 1 (dual of L-inf, default), 2 or ``"inf"``.
        loss_fn: ``(logits, y) -> (B,)`` per-sample losses; default cross-entropy.
        init_std: std of the Gaussian start (the authors' 0.001).
        clip: the valid input box ``(lo, hi)``.
        reduction: ``"mean"`` (default, the authors'), ``"sum"`` or ``"none"`` (B,).
        generator: RNG of the start noise (default: the global RNG of ``x``'s device).
        penalty_mode: ``"caller"`` (penalty pass in the caller's module modes, the authors')
            or ``"eval"``. The ascent always runs in eval mode. See the module docstring.
        hvp: how the second-order products are computed, one of {hvp methods}.
            ``"auto"`` (default): the exact linearized tangent pass when the loss is the default
            cross-entropy and every op of the model has a rule, except the op classes
            measured slower there, ``lfr_ext.hvp.AUTO_DECLINED_CLASSES``; else double backprop
            (the authors'). The table of :mod:`lfr_ext.hvp` says what each method is and
            whether it is exact, takes a ``grad_scaler`` or gives per-sample penalties.
        impl: implementation of the fused ascent op (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``, ``"reference"``; ``None`` reads ``$LFR_EXT_IMPL``). See :mod:`lfr_ext.ops`.
        validate: check ``x`` and ``y`` before any work: their types and shapes (floating ``x``
            with a batch dimension, one ``y`` per sample, integer class indices for the default
            loss), devices and dtypes (``y``, the parameters and ``generator`` where ``x`` is,
            the parameters in ``x``'s dtype) and the values of ``x`` (finite, inside ``clip``;
            one host sync). ``False`` skips all of these, not only the value check, e.g. in a
            loop whose data was checked once; the other arguments are always checked.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 mixed-precision loop. The input
            gradients and HVPs are taken on scaled losses and unscaled out of place (PyTorch's
            gradient-penalty AMP recipe; the summed losses by ``scale / B``), so they do not
            underflow in fp16; the returned penalty is unscaled (backprop
            ``grad_scaler.scale(loss)`` as usual), and its gradients are NaN when the ascent
            overflowed, so that ``grad_scaler.step`` skips the step. bf16 needs no scaler.
    Returns:
        Scalar penalty (``reduction="mean"``/``"sum"``) or per-sample penalties (B,), in
        ``x``'s dtype. An empty batch gives 0 (or an empty (0,)) that still backprops.
    """
    reduction = check_reduction(reduction)
    penalty_mode = check_penalty_mode(penalty_mode)
    cfg = _configure(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        q=q,
        loss_fn=loss_fn,
        init_std=init_std,
        clip=clip,
        generator=generator,
        hvp=hvp,
        impl=impl,
        validate=validate,
        penalty_mode=penalty_mode,
        grad_scaler=grad_scaler,
    )
    if x.shape[0] == 0:
        return _empty_penalty(unwrapped(model), x, reduction)
    with _ascended(model, x, y, cfg) as run, preserved_state(run.net):
        per_sample = _penalty_pass(run.net, run.x_adv, y, cfg, penalty_mode, run.modes, reduction)
        return run.step.close_after_backward(_poisoned_if_overflowed(_reduce(per_sample, reduction), run.finite))


def lfr_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    eps: float,
    step_size: float,
    steps: int,
    q: float | str = 1,
    loss_fn: LossFn | None = None,
    init_std: float = 1e-3,
    clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    penalty_mode: str = "caller",
    hvp: str = "auto",
    impl: str | None = None,
    validate: bool = True,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> LFRLoss:
    r"""The authors' training loss ``mean_i l(f(x_i), y_i) + lam * P`` and its parts.

    Order as in the authors' code: the ascent (eval mode), then the clean forward ``model(x)``
    in the caller's mode (an ordinary forward: it updates BatchNorm running statistics in
    train mode, like your own training step would), then the penalty pass (which does not).
    Arguments as in :func:`flatness_penalty`; ``lam >= 0`` weighs the penalty. With an fp16
    ``grad_scaler``: ``grad_scaler.scale(out.loss).backward(); grad_scaler.step(opt);
    grad_scaler.update()``.

    Returns:
        :class:`LFRLoss` ``(loss, natural_loss, penalty, logits)``: scalars, and logits (B, C).
    """
    check_lam(lam)
    penalty_mode = check_penalty_mode(penalty_mode)
    cfg = _configure(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        q=q,
        loss_fn=loss_fn,
        init_std=init_std,
        clip=clip,
        generator=generator,
        hvp=hvp,
        impl=impl,
        validate=validate,
        penalty_mode=penalty_mode,
        grad_scaler=grad_scaler,
    )
    if x.shape[0] == 0:
        zero = _empty_penalty(unwrapped(model), x, "mean")
        return LFRLoss(zero, zero, zero, x.new_zeros(0))
    with _ascended(model, x, y, cfg) as run:
        # The clean forward is outside preserved_state on purpose: it is the caller's own forward, and
        # through a DDP wrapper it prepares the gradient synchronisation of the step's backward.
        logits = model(x)
        natural_loss = cfg.loss_fn(logits, y)
        if natural_loss.shape != (x.shape[0],):
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({x.shape[0]},), got {tuple(natural_loss.shape)}"
            )
        natural_loss = run.step.close_after_backward(natural_loss.mean())
        with preserved_state(run.net):
            penalty = _penalty_pass(run.net, run.x_adv, y, cfg, penalty_mode, run.modes, "mean").mean()
        penalty = run.step.close_after_backward(_poisoned_if_overflowed(penalty, run.finite))
    return LFRLoss(natural_loss + lam * penalty, natural_loss, penalty, logits)


def check_lfr_loss_arguments(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **lfr_kwargs) -> None:
    """Every check :func:`lfr_loss` makes on these arguments (``x`` and ``y`` included), without
    taking a step: for callers that check once and then call it with ``validate=False``."""
    bound = inspect.signature(lfr_loss).bind(model, x, y, **lfr_kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    check_lam(arguments.pop("lam"))
    arguments["penalty_mode"] = check_penalty_mode(arguments["penalty_mode"])
    arguments["validate"] = True
    _configure(**arguments)


def local_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    q: float | str = 1,
    loss_fn: LossFn | None = None,
    init_std: float = 1e-3,
    clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    impl: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""Per-sample local flatness ``LF(x_i) = max_{x' in B(x_i, eps) ∩ box} ||grad l(x')||_q``
    as an evaluation metric: (B,), detached, model in eval mode throughout.

    The max is estimated from below by the same ascent as :func:`flatness_penalty`: the
    largest gradient norm seen at any iterate ``x'_0 .. x'_K`` (the final one included).
    Arguments as in :func:`flatness_penalty`.
    """
    cfg = _configure(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        q=q,
        loss_fn=loss_fn,
        init_std=init_std,
        clip=clip,
        generator=generator,
        hvp=hvp,
        impl=impl,
        validate=validate,
    )
    if x.shape[0] == 0:
        return x.new_zeros(0)
    with torch.enable_grad(), _ascended(model, x.detach(), y, cfg, close_at_exit=True) as run, preserved_state(run.net):
        set_eval(run.net)
        x_final = run.x_adv.detach().requires_grad_(True)
        final_norm = grad_norm_reference(input_gradient(run.net, x_final, y, cfg.loss_fn, create_graph=False), cfg.q)
    return torch.cat([run.path_norms, final_norm[None]]).amax(dim=0).detach()


# The hvp= names come from lfr_ext.hvp's records, so the list cannot miss a method (no
# docstring to fill under python -OO).
if flatness_penalty.__doc__:
    flatness_penalty.__doc__ = flatness_penalty.__doc__.replace(
        "{hvp methods}", ", ".join(f'``"{name}"``' for name in HVP_METHODS)
    )

__all__ = ["flatness_penalty", "lfr_loss", "local_flatness", "LFRLoss"]
