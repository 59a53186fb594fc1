r"""Pure-PyTorch reference of Local Flatness Regularization (LFR), written for clarity.

Xu, Li, Jiang, Xia, "Adversarial Defense via Local Flatness Regularization", ICIP 2020.

For a batch ``x`` in ``[lo, hi]`` with labels ``y`` and per-sample loss ``l_i = l(f(x_i), y_i)``:

1. Start:  ``x'_0 = clip_[lo,hi](x + init_std * N(0, I))``.
2. ``K`` ascent steps (model in eval mode):

   .. math::
      g = \nabla_{x'} \sum_i l_i(x'),\qquad
      h = \nabla_{x'} \sum_i \|g_i\|_q \;(= H\,\partial\|g\|_q/\partial g,\ \text{an HVP}),\\
      x' \leftarrow \mathrm{clip}_{[lo,hi]}\big(\mathrm{proj}_{\|x'-x\|_\infty\le\epsilon}
      (x' + \alpha\,\mathrm{sign}(h))\big).

3. Penalty at the final point, differentiable w.r.t. the parameters:
   ``P = mean_i ||grad_{x'} l_i(x'_i)||_q`` (double backprop: ``create_graph=True``).
4. The authors' loss: ``CE(f(x), y) + lam * P``.

The per-sample input gradient comes from the *sum* of per-sample losses, so a sample's
gradient does not depend on the batch it sits in (in eval mode), as in attack libraries.
The authors take the gradient of the batch-mean loss and rescale; for a power-of-two batch
the two agree bit for bit, otherwise to rounding.

Everything here is plain differentiable PyTorch, written once for clarity: the oracle of the
tests and the baseline of the benchmarks. It does not touch module modes or state
(:mod:`lfr_ext.penalty` does that bookkeeping) and knows nothing of mixed precision: the
engines that run in training, fp16 loss scaling included, are in :mod:`lfr_ext.hvp`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy. logits: (B, C), y: (B,) int64 -> (B,)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(logits_hint(logits))
    return F.cross_entropy(logits, y, reduction="none")


def logits_hint(output) -> str:
    """The error for a model whose forward does not return the logits tensor."""
    return (
        f"the model returned a {type(output).__name__}, not a logits tensor: wrap it as "
        "lfr_ext.PixelClassifier(model, logits=...) to say which part of the output is the logits"
    )


# --------------------------------------------------------------------------------------
# Per-op references (the fused kernels must match these)
# --------------------------------------------------------------------------------------
def grad_norm_reference(g: torch.Tensor, q: float) -> torch.Tensor:
    r"""Per-sample norm ``||g_i||_q`` of ``g`` (B, ...) -> (B,), in ``g``'s dtype.

    Differentiable (twice) through PyTorch's own ops; subgradients at ties and zeros are
    PyTorch's: ``d|t|/dt = sign(t)`` (0 at 0) for q=1; ``g/||g||_2`` and 0 at ``g = 0`` for
    q=2; for q=inf, ``sign(g_j)`` split evenly among the entries that attain the max.
    """
    flat = g.flatten(1) if g.dim() > 1 else g.reshape(g.shape[0], 1)  # flatten(1) is safe for B = 0
    if q == 1:
        return flat.abs().sum(dim=1)
    if q == 2:
        return torch.linalg.vector_norm(flat, 2, dim=1)
    if math.isinf(q):
        if flat.shape[1] == 0:  # amax of an empty row is undefined; the norm of nothing is 0
            return flat.new_zeros(flat.shape[0])
        return flat.abs().amax(dim=1)
    raise ValueError(f"q must be 1, 2 or inf, got {q!r}")


def project_linf(x_moved: torch.Tensor, x: torch.Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """``clip_[lo,hi](min(max(x_moved, x - eps), x + eps))``: back into the L-inf ball of radius
    ``eps`` around ``x``, then into the box (the threat model of every attack here)."""
    return torch.clamp(torch.min(torch.max(x_moved, x - eps), x + eps), lo, hi)


def ascent_step_reference(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    step_size: float,
    lo: float,
    hi: float,
    q: float,
    return_sign_g: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One projected sign-ascent step, as an eager chain of PyTorch ops.

    ``x_new = clip_[lo,hi](min(max(x_adv + step_size * sign(h), x - eps), x + eps))``,
    ``g_norm = ||g_i||_q`` and ``sign(g)`` (an empty tensor unless ``return_sign_g``).

    Args:
        x, x_adv, h, g: (B, ...) tensors of one shape and dtype.
    Returns:
        ``(x_new (B, ...), g_norm (B,), sign_g (B, ...) or (0,))``, all in ``x``'s dtype.
    """
    x_new = project_linf(x_adv + step_size * torch.sign(h), x, eps, lo, hi)
    g_norm = grad_norm_reference(g, q)
    sign_g = torch.sign(g) if return_sign_g else g.new_empty(0)
    return x_new, g_norm, sign_g


# --------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------
def per_sample_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """``l_i = loss_fn(model(x), y)``, checked to be one loss per sample: (B,)."""
    losses = loss_fn(model(x), y)
    if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({x.shape[0]},), got {shape}; "
            "use reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
        )
    return losses


def input_gradient(
    model: torch.nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    create_graph: bool,
) -> torch.Tensor:
    r"""Per-sample input gradient ``g = \nabla_{x'} \sum_i l_i(x')``: (B, ...).

    ``x_adv`` must require grad. With ``create_graph=True`` the result is differentiable
    (w.r.t. ``x_adv`` and the parameters): the double-backprop graph.
    """
    losses = per_sample_loss(model, x_adv, y, loss_fn)
    (g,) = torch.autograd.grad(losses.sum(), x_adv, create_graph=create_graph)
    return g


def grad_and_hvp_double_backprop(
    model: torch.nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    norm_fn: Callable = grad_norm_reference,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``g = \nabla_{x'} \sum l_i`` and ``h = \nabla_{x'} \sum_i \|g_i\|_q`` by double backprop.

    ``h = H v`` with ``v = \partial \sum_i\|g_i\|_q / \partial g`` (``sign(g)`` for q=1): the
    Hessian-vector product the authors compute. Both outputs are detached, (B, ...).
    ``norm_fn(g, q)`` computes the per-sample norms (it must be twice differentiable). An
    ``x_adv`` that is already a leaf requiring grad is differentiated as it is (a function
    compiled whole may not call ``requires_grad_()`` on its input in torch 2.11: the caller does
    it outside).
    """
    if not (x_adv.is_leaf and x_adv.requires_grad):
        x_adv = x_adv.detach().requires_grad_(True)
    g = input_gradient(model, x_adv, y, loss_fn, create_graph=True)
    total = norm_fn(g, q).sum()
    if not total.requires_grad:  # g does not depend on x' (a model with zero gradients, e.g. quantised inputs)
        h = torch.zeros_like(x_adv)
    else:
        (h,) = torch.autograd.grad(total, x_adv)
    return g.detach(), h.detach()


def initial_point(
    x: torch.Tensor, init_std: float, clip: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """``x'_0 = clip(x + init_std * N(0, I))``; the noise is drawn from ``generator`` (or the
    global RNG of ``x``'s device), in ``x``'s dtype, as the authors' ``torch.randn`` does."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.clamp(x + init_std * noise, clip[0], clip[1])


def flatness_ascent_reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    q: float = 1,
    loss_fn: LossFn = default_loss,
    init_std: float = 1e-3,
    clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    ascent_step: Callable = ascent_step_reference,
    grad_and_hvp: Callable = grad_and_hvp_double_backprop,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: the ascended point ``x'`` (B, ...) and the gradient norms seen on the way,
    ``(steps, B)`` (row k is ``||g_i||_q`` at ``x'_k``). Call with the model in eval mode.

    ``h`` enters only through its sign, which is piecewise constant, so ``x'`` depends on
    ``x`` only through the start, the eps-projection and the box clip. If ``x`` requires
    grad, that dependence is kept in the returned ``x'`` (elementwise, cheap): its autograd
    derivative is the exact almost-everywhere derivative of the ascent map.
    ``ascent_step`` and ``grad_and_hvp`` are swappable for the fused ops and faster HVPs.
    """
    x_adv = initial_point(x, init_std, clip, generator)
    norms = []
    for _ in range(steps):
        g, h = grad_and_hvp(model, x_adv, y, loss_fn, q)
        x_adv, g_norm, _ = ascent_step(x, x_adv, h, g, eps, step_size, clip[0], clip[1], q)
        norms.append(g_norm)
    path_norms = torch.stack(norms) if norms else x.new_zeros(0, x.shape[0])
    return x_adv, path_norms


def penalty_at(
    model: torch.nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    q: float = 1,
    loss_fn: LossFn = default_loss,
    norm_fn: Callable = grad_norm_reference,
) -> torch.Tensor:
    r"""Step 3: per-sample ``||\nabla_{x'} l_i(x')||_q`` (B,), differentiable w.r.t. the
    parameters (double backprop). Runs in whatever mode the model is in."""
    if not x_adv.requires_grad:  # else x' is a function of x whose derivative is kept
        x_adv = x_adv.detach().requires_grad_(True)
    g = input_gradient(model, x_adv, y, loss_fn, create_graph=True)
    return norm_fn(g, q)


def flatness_penalty_reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    q: float = 1,
    loss_fn: LossFn = default_loss,
    init_std: float = 1e-3,
    clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Steps 1-3 with the authors' mode policy (ascent in eval mode, penalty in the mode the
    model was in), mean over the batch. No validation and no state protection: the oracle."""
    was_training = model.training
    model.eval()
    try:
        x_adv, _ = flatness_ascent_reference(
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
        )
    finally:
        model.train(was_training)
    return penalty_at(model, x_adv, y, q=q, loss_fn=loss_fn).mean()
