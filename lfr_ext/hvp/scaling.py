"""fp16 loss scaling of the second-order engines' backward passes."""

from __future__ import annotations

import torch


def scaled(total: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    return total if loss_scale is None else total * loss_scale


def unscaled(grad: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    return grad if loss_scale is None else grad / loss_scale
