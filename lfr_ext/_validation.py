"""Argument checks of the public API: clear errors naming the argument, before any work."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

_REDUCTIONS = ("mean", "sum", "none")
_PENALTY_MODES = ("caller", "eval")


def normalize_q(q) -> float:
    """1, 2 or math.inf (also accepts the strings 'inf' / 'Linf' and float('inf'))."""
    if isinstance(q, str) and q.lower() in {"inf", "linf"}:
        return math.inf
    if isinstance(q, numbers.Real) and not isinstance(q, bool) and (q in (1, 2) or math.isinf(q) and q > 0):
        return math.inf if math.isinf(q) else int(q)
    raise ValueError(f"q must be 1, 2 or inf (the dual norm of the threat model), got {q!r}")


def _finite_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_attack_args(*, eps, step_size, steps, init_std, clip) -> tuple[float, float, int, float, tuple[float, float]]:
    eps = _finite_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    step_size = _finite_real("step_size", step_size)
    if steps > 0 and step_size <= 0:
        raise ValueError(f"step_size must be > 0 when steps > 0, got {step_size}")
    init_std = _finite_real("init_std", init_std)
    if init_std < 0:
        raise ValueError(f"init_std must be >= 0, got {init_std}")
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip must be a pair (lo, hi), got {clip!r}")
    lo, hi = _finite_real("clip[0]", clip[0]), _finite_real("clip[1]", clip[1])
    if lo > hi:
        raise ValueError(f"clip must satisfy lo <= hi, got {clip!r}")
    return eps, step_size, int(steps), init_std, (lo, hi)


def check_lam(lam) -> float:
    """The penalty weight of lfr_loss: a finite number >= 0."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 <= lam < math.inf:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return float(lam)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, _REDUCTIONS)


def check_penalty_mode(mode) -> str:
    return check_choice("penalty_mode", mode, _PENALTY_MODES)


def check_grad_scaler(grad_scaler):
    """None, or a ``torch.amp.GradScaler`` (its CUDA alias included)."""
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# The integer dtypes taken as class indices. int8 is not among them: it cannot index more than 128
# classes, and a label that wrapped around on the way to int8 would go unnoticed.
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_model_and_data(model, x, y, clip, *, default_loss: bool, generator) -> None:
    """Types, shapes, devices and values of x, y against ``model`` (an ``nn.Module``, see
    :func:`check_model`); one host sync for the value checks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape (B, ...), got a 0-dim tensor")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one entry per sample of x: shape ({x.shape[0]}, ...), got {tuple(y.shape)}")
    if default_loss:
        if y.dim() != 1:
            raise ValueError(
                f"y must be class indices of shape ({x.shape[0]},) for the default loss, got {tuple(y.shape)}"
            )
        if y.dtype not in LABEL_DTYPES:
            raise TypeError(f"y must be an integer tensor of class indices for the default loss, got dtype {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params:
        if params[0].device != x.device:
            raise ValueError(f"model is on {params[0].device} but x is on {x.device}")
        if params[0].dtype != x.dtype:
            raise TypeError(f"model's parameters are {params[0].dtype} but x is {x.dtype}; cast one of them")
    if generator is not None and torch.device(generator.device).type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
    if x.numel() == 0:
        return
    finite, above, below = torch.stack([x.isfinite().all(), (x >= clip[0]).all(), (x <= clip[1]).all()]).tolist()
    if not finite:
        raise ValueError("x contains NaN or inf")
    if not (above and below):
        raise ValueError(
            f"x must lie inside clip={tuple(clip)}: got values in [{x.min().item():g}, {x.max().item():g}]; "
            "LFR searches x' in the eps-ball intersected with that box"
        )
