"""The direction ``v`` of every inner Hessian-vector product: the subgradient of the norm."""

from __future__ import annotations

import torch

from ..reference import grad_norm_reference


def norm_subgradient(g: torch.Tensor, q: float) -> torch.Tensor:
    """``d sum_i ||g_i||_q / dg`` (B, ...), with the conventions of
    :func:`lfr_ext.reference.grad_norm_reference` (``sign(g)`` for q=1, ``g/||g||`` and 0 at
    0 for q=2, ``sign`` split evenly among the max entries for q=inf)."""
    if q == 1:
        return torch.sign(g)
    with torch.enable_grad():
        leaf = g.detach().requires_grad_(True)
        (s,) = torch.autograd.grad(grad_norm_reference(leaf, q).sum(), leaf)
    return s
