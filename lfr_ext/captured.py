r"""One LFR training step as one CUDA graph: ``CapturedStep``.

On small models an LFR step is launch-bound: K ascent steps of a few dozen small kernels each,
plus the penalty, its backward and the optimizer step. ``CapturedStep`` is
:class:`lfr_ext.graphed_step.GraphedStep` for :func:`lfr_ext.lfr_loss`::

    step = lfr_ext.CapturedStep(model, optimizer, x0, y0, lam=0.02, eps=0.3, step_size=0.01, steps=40)
    for x, y in loader:                      # same shapes as x0, y0 (else: eager, with a warning)
        out = step(x, y)                     # LFRLoss(loss, natural_loss, penalty, logits)

See :mod:`lfr_ext.graphed_step` for what the capture does on your behalf (a warm-up that is
undone, host-sync detection before capturing, re-capture when hyper-parameters or modes change,
eager fallback with one warning) and for the optimizers whose tensor learning rate a graph can
read (``SGD(..., fused=True)``, ``Adam/AdamW(..., capturable=True)``). ``generator=`` is not
supported: the start noise and Dropout draw from the default CUDA generator, which PyTorch keeps
graph-safe.
"""

from __future__ import annotations

import torch
from torch import nn

from .graphed_step import GraphedStep
from .penalty import LFRLoss, check_lfr_loss_arguments, lfr_loss


class CapturedStep(GraphedStep):
    """A whole LFR training step (``lfr_loss`` + ``backward`` + ``optimizer.step``) as one
    CUDA graph.

    Args:
        model, optimizer: trained in place, as by an ordinary loop.
        example_x: (B, ...) a batch with the shapes, dtype and device of every later batch.
        example_y: (B,) its labels.
        warmup_steps: eager iterations before the capture (undone afterwards), >= 2.
        **lfr_kwargs: the arguments of :func:`lfr_ext.lfr_loss` (``lam``, ``eps``,
            ``step_size``, ``steps``, ``q``, ``hvp``, ``impl``, ...). The inputs are validated
            once, on the example batch; later batches are not checked (that would sync).

    Calling it returns the step's :class:`lfr_ext.LFRLoss`, detached.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_x: torch.Tensor,
        example_y: torch.Tensor,
        *,
        warmup_steps: int = 3,
        **lfr_kwargs,
    ):
        if lfr_kwargs.get("generator") is not None:
            raise ValueError(
                "CapturedStep draws its randomness from the default CUDA generator; generator= is not supported"
            )
        if lfr_kwargs.get("grad_scaler") is not None:
            raise ValueError(
                "CapturedStep cannot take a grad_scaler: GradScaler.step reads found_inf on the host, "
                "which a CUDA graph cannot capture; use bf16 autocast (no scaler) for a captured step"
            )
        self.lfr_kwargs = {k: v for k, v in lfr_kwargs.items() if k not in ("validate", "generator")}
        check_lfr_loss_arguments(model, example_x, example_y, **self.lfr_kwargs)
        super().__init__(model, optimizer, self._lfr_loss, example_x, example_y, warmup_steps=warmup_steps)

    def _lfr_loss(self, x: torch.Tensor, y: torch.Tensor) -> LFRLoss:
        return lfr_loss(self.model, x, y, validate=False, **self.lfr_kwargs)
