"""The ``lfr_ext::*`` operators: Python entry points, fake kernels and implementation choice.

Each op has several implementations, chosen per call by ``impl``:

============  ===============================================================
``reference`` eager chain of PyTorch ops (:mod:`lfr_ext.reference`); always available
``cpu``       C++ kernel of the compiled library, CPU tensors
``cuda``      CUDA kernel of the compiled library, CUDA tensors
``triton``    Triton kernel (GPU, or CPU tensors under ``TRITON_INTERPRET=1``)
``auto``      the fastest available for the tensors' device (the default)
============  ===============================================================

``impl=None`` reads the ``LFR_EXT_IMPL`` environment variable, then falls back to ``auto``.
An explicitly requested implementation that is not available raises; ``auto`` never does.
"""

from __future__ import annotations

import os

import torch

from . import _extension
from .reference import ascent_step_reference, q_code

IMPLS = ("auto", "triton", "cuda", "cpu", "reference")
# Preference order of `auto` per device type, fastest first.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def _unavailable_reason(impl: str, device: torch.device) -> str | None:
    """None when ``impl`` can run on ``device``, else a sentence saying why not."""
    if impl == "reference":
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, got {device}"
        return None if _extension.is_loaded() else _extension.status().error
    if impl == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, got {device}"
        if not _extension.is_loaded():
            return _extension.status().error
        return None if _extension.status().with_cuda else "the compiled library was built without CUDA sources"
    if impl == "triton":
        return "the Triton kernels are not part of this build"
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def available_impls(device: torch.device | str) -> list[str]:
    """Implementations that can run on ``device`` here, in ``auto``'s order of preference."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return [impl for impl in order if _unavailable_reason(impl, device) is None]


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Turn ``impl`` (or ``$LFR_EXT_IMPL``, or ``auto``) into a concrete implementation."""
    requested = impl if impl is not None else os.environ.get("LFR_EXT_IMPL", "auto")
    if requested not in IMPLS:
        source = "impl" if impl is not None else "LFR_EXT_IMPL"
        raise ValueError(f"{source} must be one of {IMPLS}, got {requested!r}")
    if requested == "auto":
        return available_impls(device)[0]
    reason = _unavailable_reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"lfr_ext: impl={requested!r} is not available on {device}: {reason}")
    return requested


# --------------------------------------------------------------------------------------
# ascent_step
# --------------------------------------------------------------------------------------
def _register_fakes() -> None:
    """Fake (meta) kernels for the C++-defined ops, so torch.compile can trace them."""

    @torch.library.register_fake("lfr_ext::ascent_step")
    def _(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g):
        torch._check(x.dim() >= 1, lambda: "ascent_step: x needs a batch dimension")
        torch._check(x.shape == x_adv.shape == h.shape == g.shape, lambda: "ascent_step: shapes differ")
        torch._check(x.dtype == x_adv.dtype == h.dtype == g.dtype, lambda: "ascent_step: dtypes differ")
        x_new = x.new_empty(x.shape)
        sign_g = x.new_empty(x.shape) if return_sign_g else x.new_empty(0)
        return x_new, x.new_empty(x.shape[0]), sign_g


if _extension.is_loaded():
    _register_fakes()


def ascent_step(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    lo: float = 0.0,
    hi: float = 1.0,
    q: float = 1,
    return_sign_g: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Fused LFR ascent update and per-sample gradient norm, in one pass.

    ``x_new = clip_[lo,hi](proj_{||x_new - x||_inf <= eps}(x_adv + step_size * sign(h)))``,
    ``g_norm_i = ||g_i||_q`` (accumulated in fp32, fp64 for fp64 inputs), ``sign(g)``.

    Args:
        x: (B, ...) clean inputs, the centre of the eps-ball.
        x_adv: (B, ...) current point; h: (B, ...) ascent direction (only its sign is used);
        g: (B, ...) input gradient whose norm is reported. All four share shape and dtype.
        eps, step_size: ball radius and step; lo, hi: the box; q: 1, 2 or ``math.inf``.
        return_sign_g: also return ``sign(g)`` (else an empty tensor).
        impl: see the module docstring.
    Returns:
        ``(x_new (B, ...), g_norm (B,), sign_g)``, in the inputs' dtype; ``sign(0) = 0``.
    """
    chosen = resolve_impl(impl, x.device)
    if chosen == "reference":
        return ascent_step_reference(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g)
    return torch.ops.lfr_ext.ascent_step(
        x, x_adv, h, g, float(eps), float(step_size), float(lo), float(hi), q_code(q), bool(return_sign_g)
    )
