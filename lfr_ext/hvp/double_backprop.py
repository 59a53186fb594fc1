"""``hvp="double_backprop"``: the authors' way, ``create_graph=True`` and a gradient of a gradient.

The inner step is :func:`lfr_ext.reference.grad_and_hvp_double_backprop` and the penalty
:func:`lfr_ext.reference.penalty_at`, run with attention on a backend that has a double backward.
Every other method's penalty falls back to this one where it has none of its own.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..reference import LossFn, grad_and_hvp_double_backprop, penalty_at
from .cache import CACHE


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


def grad_and_hvp(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
                 norm_fn: Callable, loss_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, H v)`` at ``x_adv`` (B, ...) each, detached, by double backprop."""
    with twice_differentiable_attention(model):
        return grad_and_hvp_double_backprop(model, x_adv, y, loss_fn, q, norm_fn=norm_fn, loss_scale=loss_scale)


def penalty(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, q: float,
            norm_fn: Callable, loss_scale: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``||g_i||_q`` (B,), differentiable by double backprop."""
    with twice_differentiable_attention(model):
        return penalty_at(model, x_adv, y, q=q, loss_fn=loss_fn, norm_fn=norm_fn, loss_scale=loss_scale)
