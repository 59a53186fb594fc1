"""Loss-landscape slices around test points (the paper's visual argument: LFR flattens the
loss surface in input space, where a plain model's is steep).

Directions are in input space: ``d_adv = sign(grad_x L)`` (the model's own steepest L-inf
ascent direction, so each model is cut along the direction that hurts it most) and
``d_rand``, a fixed random sign vector (Rademacher). Points are ``clip(x + a d_adv + b d_rand)``
with ``a, b`` in ``[-radius, radius]``, where the L-inf distance from x is at most max(|a|, |b|)
before clipping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_adv, d_rand), each shaped like x (B, ...), entries in {-1, 0, +1}."""
    x_req = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    generator = torch.Generator().manual_seed(seed)
    d_rand = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
    return grad.sign(), d_rand


@torch.no_grad()
def _losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """Per-sample CE at ``clip(x + offsets[k])`` for offsets (K, B, ...): (K, B)."""
    k, b = offsets.shape[:2]
    points = (x.unsqueeze(0) + offsets).clamp(0.0, 1.0).reshape(k * b, *x.shape[1:])
    labels = y.repeat(k)
    losses = [F.cross_entropy(model(p), t, reduction="none") for p, t in zip(points.split(chunk), labels.split(chunk))]
    return torch.cat(losses).reshape(k, b)


def loss_slices(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    radius: float,
    points_1d: int = 41,
    points_2d: int = 21,
    seed: int = 0,
) -> dict:
    """1-D and 2-D loss slices around each of the B samples (x (B, C, H, W), y (B,)).

    Returns lists (JSON-ready): ``t`` (points_1d,), ``loss_adv`` and ``loss_rand`` (B, points_1d)
    along d_adv and d_rand, ``grid`` (points_2d,) and ``loss_2d`` (B, points_2d, points_2d)
    with rows along d_adv and columns along d_rand. The model is put in eval mode.
    """
    model.eval()
    d_adv, d_rand = _directions(model, x, y, seed)
    t = torch.linspace(-radius, radius, points_1d, dtype=x.dtype)
    shape = (-1,) + (1,) * x.dim()
    loss_adv = _losses(model, x, y, t.view(shape) * d_adv)
    loss_rand = _losses(model, x, y, t.view(shape) * d_rand)
    grid = torch.linspace(-radius, radius, points_2d, dtype=x.dtype)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    offsets = a.reshape(shape) * d_adv + b.reshape(shape) * d_rand
    loss_2d = _losses(model, x, y, offsets).reshape(points_2d, points_2d, -1).permute(2, 0, 1)
    return {
        "radius": radius,
        "t": t.tolist(),
        "loss_adv": loss_adv.T.tolist(),
        "loss_rand": loss_rand.T.tolist(),
        "grid": grid.tolist(),
        "loss_2d": loss_2d.tolist(),
    }
