"""``hvp="double_backprop"``: the authors' way, ``create_graph=True`` and a gradient of a gradient.

The inner step and the penalty are the oracle's
(:func:`lfr_ext.reference.grad_and_hvp_double_backprop`, :func:`lfr_ext.reference.penalty_at`)
with every backward on the fp16-scaled loss (:mod:`lfr_ext.hvp.scaling`), run with attention
on a backend that has a double backward. The methods without a penalty of their own
(``forward``, ``finite_difference``) and ``auto``'s fallback use this one.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..reference import LossFn
from .cache import CACHE
from .facts import MethodFacts
from .scaling import scaled, scaled_input_gradient, unscaled

FACTS = MethodFacts(
    name="double_backprop",
    description="the authors': ``create_graph=True`` and a gradient of a gradient",
    exact=True,
    auto_may_choose=True,
)


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
        CACHE.warn_once(
            ("attention", type(model).__qualname__),
            f"lfr_ext: double backprop runs {type(model).__name__}'s scaled_dot_product_attention on its "
            "math backend (PyTorch's fused attention kernels have no double backward)",
            stacklevel=6,  # one frame deeper than the engine's other warnings: this context manager
        )
    with sdpa_kernel(SDPBackend.MATH):
        yield


def grad_and_hvp(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    norm_fn: Callable,
    loss_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``g = \nabla_{x'} \sum l_i`` and ``h = \nabla_{x'} \sum_i \|g_i\|_q`` (B, ...) each, detached.

    Both backwards run on scaled values and are unscaled out of place (``loss_scale``, see
    :mod:`lfr_ext.hvp.scaling`); ``norm_fn(g, q)`` gives the per-sample norms (the fused
    ``lfr_ext.ops.grad_norm`` in the public path; it must be twice differentiable).
    """
    with twice_differentiable_attention(model):
        if not (x_adv.is_leaf and x_adv.requires_grad):
            x_adv = x_adv.detach().requires_grad_(True)
        g = scaled_input_gradient(model, x_adv, y, loss_fn, create_graph=True, loss_scale=loss_scale)
        total = norm_fn(g, q).sum()
        if not total.requires_grad:  # g does not depend on x' (a model with zero gradients, e.g. quantised inputs)
            return g.detach(), torch.zeros_like(x_adv)
        (h,) = torch.autograd.grad(scaled(total, loss_scale), x_adv)
        return g.detach(), unscaled(h, loss_scale).detach()


def penalty(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    norm_fn: Callable,
    loss_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Per-sample ``||g_i||_q`` (B,), unscaled, differentiable w.r.t. the parameters (and ``x'``
    if it requires grad) by double backprop, in whatever mode the model is in."""
    with twice_differentiable_attention(model):
        if not x_adv.requires_grad:  # else x' is a function of x whose derivative is kept
            x_adv = x_adv.detach().requires_grad_(True)
        return norm_fn(scaled_input_gradient(model, x_adv, y, loss_fn, create_graph=True, loss_scale=loss_scale), q)
