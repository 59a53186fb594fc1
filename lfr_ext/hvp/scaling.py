r"""fp16 loss scaling of the second-order engines' backward passes, written once.

With a ``torch.amp.GradScaler`` (fp16 mixed precision) every backward an engine takes runs on
the scaled loss ``s * sum_i l_i``, so that small gradients do not underflow in fp16, and its
result is unscaled out of place (PyTorch's gradient-penalty recipe for ``torch.amp``). The
factor ``s`` (:func:`input_gradient_scale`) is a 0-dim fp32 tensor; ``None`` means no scaling
and every function here is then the identity on its argument.
"""

from __future__ import annotations

import torch

from ..reference import LossFn, per_sample_loss


def input_gradient_scale(grad_scaler, x: torch.Tensor) -> torch.Tensor | None:
    """The factor for losses summed over the batch ``x`` whose input gradient is taken: the
    scaler's current scale divided by the batch size (a 0-dim fp32 tensor, no host sync), so that
    the gradients reaching the logits are as large as those of the scaled *mean* loss GradScaler
    tunes its scale for (the full scale on a summed loss would overflow fp16 first). None for no
    scaler or a disabled one."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    scale = grad_scaler.scale(torch.ones((), dtype=torch.float32, device=x.device))
    return scale / max(x.shape[0], 1)


def scaled(total: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    """What a backward runs on: ``loss_scale * total`` (or the cotangent it starts from)."""
    return total if loss_scale is None else total * loss_scale


def unscaled(grad: torch.Tensor, loss_scale: torch.Tensor | None) -> torch.Tensor:
    """A gradient taken on :func:`scaled` values, divided back out of place."""
    return grad if loss_scale is None else grad / loss_scale


def scaled_input_gradient(
    model: torch.nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    create_graph: bool,
    loss_scale: torch.Tensor | None,
) -> torch.Tensor:
    r""":func:`lfr_ext.reference.input_gradient` with its backward on the scaled loss:
    ``g = \nabla_{x'} \sum_i l_i(x')`` (B, ...), taken on ``loss_scale * sum_i l_i`` and unscaled.
    ``x_adv`` must require grad; ``create_graph=True`` keeps ``g`` differentiable."""
    losses = per_sample_loss(model, x_adv, y, loss_fn)
    (g,) = torch.autograd.grad(scaled(losses.sum(), loss_scale), x_adv, create_graph=create_graph)
    return unscaled(g, loss_scale)
