"""``hvp="finite_difference"``: central differences of the gradient along ``v``.

An approximation: O(r^2) inside a linear region, arbitrary across ReLU kinks. The penalty uses
double backprop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference import LossFn
from .facts import MethodFacts
from .scaling import scaled_input_gradient
from .subgradient import norm_subgradient

FINITE_DIFFERENCE_RADIUS = 1e-3

FACTS = MethodFacts(
    name="finite_difference",
    description="central differences of ``g`` along ``v``; penalty by double backprop",
    exact=False,
    auto_may_choose=False,
)


def grad_and_hvp_finite_difference(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    loss_scale: torch.Tensor | None = None,
):
    """Approximate ``h = (g(x' + r v) - g(x' - r v)) / 2r``, ``r`` chosen per sample so the
    largest coordinate moves by ``FINITE_DIFFERENCE_RADIUS``. Eval-mode models only (the
    per-sample radii assume samples do not interact)."""

    def grad_at(z):
        return scaled_input_gradient(
            model, z.detach().requires_grad_(True), y, loss_fn, create_graph=False, loss_scale=loss_scale
        )

    g = grad_at(x_adv)
    v = norm_subgradient(g, q)
    largest = v.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    radius = (FINITE_DIFFERENCE_RADIUS / largest).view(-1, *([1] * (v.dim() - 1)))
    h = (grad_at(x_adv + radius * v) - grad_at(x_adv - radius * v)) / (2 * radius)
    return g, h
