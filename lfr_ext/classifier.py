r"""Any model as LFR and the attacks see it: pixels in ``[0, 1]`` in, a logits tensor out.

Checkpoints from elsewhere often normalise their inputs inside the data pipeline
(``(x - mean) / std``) and return tuples or dicts. Attacking them in normalised space silently
changes the threat model: a radius ``eps`` in normalised space is ``eps * std`` per channel in
pixels, and the ``[0, 1]`` box becomes a per-channel box nobody checks (torchattacks #68, #191; auto-attack
#13, #46). :class:`PixelClassifier` moves the normalisation into the model, so every radius,
every projection and the box stay in pixel space, and picks the logits out of the output::

    net = lfr_ext.PixelClassifier(model, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
                                  logits="logits")
    lfr_ext.lfr_loss(net, x, y, lam=0.1, eps=8 / 255, step_size=2 / 255, steps=3)   # x in [0, 1]
    lfr_ext.evaluate_model(net, x, y, eps=8 / 255)

The wrapper holds ``model`` as its one submodule (its state_dict keys gain a ``model.`` prefix;
``mean`` and ``std`` are not saved) and changes nothing of it. ``(x - mean) / std`` is a
subtraction and a division by constants, which the linearized engine records exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

LogitsSelector = Union[None, int, str, Callable[[object], torch.Tensor]]


def _channel_constant(values, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if tensor.numel() == 0 or not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite numbers (one per channel), got {values!r}")
    return tensor


class PixelClassifier(nn.Module):
    """``forward(x) = select(model((x - mean) / std))``: (B, C, H, W) pixels in [0, 1] -> (B, K) logits.

    Args:
        model: the network, as trained (it may expect normalised inputs, return a tuple or dict).
        mean, std: per-channel normalisation the model expects (a number or C numbers each), or
            None for none. ``std`` must be positive.
        logits: which part of the output is the logits: None (the output itself), an int (index
            into a tuple or list), a str (key of a dict, or attribute of an output object), or a
            callable ``output -> logits``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        logits: LogitsSelector = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if not (logits is None or isinstance(logits, (int, str)) or callable(logits)) or isinstance(logits, bool):
            raise TypeError(f"logits must be None, an int, a str or a callable, got {type(logits).__name__}")
        self.model = model
        self.logits = logits
        self.normalized = mean is not None
        if self.normalized:
            mean_t, std_t = _channel_constant(mean, "mean"), _channel_constant(std, "std")
            if (std_t <= 0).any():
                raise ValueError(f"std must be positive, got {std!r}")
            if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
                raise ValueError(f"mean has {mean_t.numel()} values and std {std_t.numel()}: give one per channel")
            like = _floating_tensor(model)  # the buffers follow the model's dtype and device (and .to())
            self.register_buffer("mean", mean_t.to(like).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", std_t.to(like).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalized:
            if x.dim() != 4:
                raise ValueError(f"PixelClassifier normalises images (B, C, H, W); got x of shape {tuple(x.shape)}")
            channels = max(self.mean.shape[1], self.std.shape[1])
            if channels not in (1, x.shape[1]):
                raise ValueError(f"mean/std have {channels} channels but x has {x.shape[1]}")
            x = (x - self.mean.to(device=x.device, dtype=x.dtype)) / self.std.to(device=x.device, dtype=x.dtype)
        return select_logits(self.model(x), self.logits)


def select_logits(output, logits: LogitsSelector) -> torch.Tensor:
    """The logits tensor in a model's ``output`` (see :class:`PixelClassifier`)."""
    if logits is None:
        chosen = output
    elif callable(logits) and not isinstance(logits, (int, str)):
        chosen = logits(output)
    elif isinstance(logits, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(f"logits={logits} indexes a tuple or list, but the model returned {type(output).__name__}")
        chosen = output[logits]
    elif isinstance(output, dict):
        if logits not in output:
            raise KeyError(f"logits={logits!r} is not a key of the model's output (keys: {sorted(map(str, output))})")
        chosen = output[logits]
    else:
        if not hasattr(output, logits):
            raise AttributeError(f"logits={logits!r}: the model's {type(output).__name__} output has no such field")
        chosen = getattr(output, logits)
    if not isinstance(chosen, torch.Tensor):
        hint = "" if logits is not None else " (pass logits= to say which part of the output is the logits)"
        raise TypeError(f"the model's output is a {type(chosen).__name__}, not a logits tensor{hint}")
    return chosen


def _floating_tensor(model: nn.Module) -> torch.Tensor:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.empty(0)


__all__ = ["LogitsSelector", "PixelClassifier", "select_logits"]
