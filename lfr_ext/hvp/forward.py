"""``hvp="forward"``: ``torch.func`` forward-over-reverse for the inner HVPs.

Exact for smooth and piecewise-linear models. The penalty uses double backprop (never forward
AD for the outer gradient: PyTorch's train-mode batch_norm forward-AD rule is wrong there).
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference import LossFn
from .facts import MethodFacts
from .scaling import scaled, unscaled
from .subgradient import norm_subgradient

FACTS = MethodFacts(
    name="forward",
    description="``torch.func`` forward-over-reverse; penalty by double backprop",
    exact=True,
    auto_may_choose=False,
)


def grad_and_hvp_forward(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    q: float,
    loss_scale: torch.Tensor | None = None,
):
    """``g`` and ``h`` by ``torch.func``: ``h = jvp(grad(sum l), x', v)`` (forward-over-reverse)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def total_loss(z):
        losses = loss_fn(torch.func.functional_call(model, (params, buffers), (z,)), y)
        return scaled(losses.sum(), loss_scale)

    x = x_adv.detach()
    g = unscaled(torch.func.grad(total_loss)(x), loss_scale)
    v = norm_subgradient(g, q)
    _, h = torch.func.jvp(torch.func.grad(total_loss), (x,), (v,))
    return g.detach(), unscaled(h, loss_scale).detach()
