"""The Triton kernels registered as PyTorch operators: ``lfr_ext::ascent_step_triton`` and
``lfr_ext::grad_norm_triton``, with the same schemas as the C++ ops ``lfr_ext::ascent_step``
and ``lfr_ext::grad_norm``.

On a GPU they are ``torch.library.triton_op``s whose kernels are launched through
``wrap_triton``: ``torch.compile`` sees the kernels themselves (and can fuse around them), and
the op body doubles as the fake kernel. Under ``TRITON_INTERPRET=1`` (how CI runs them on CPU
tensors) ``@triton.jit`` returns interpreter functions that ``wrap_triton`` cannot trace, so the
same functions are registered as opaque ``torch.library.custom_op``s with explicit fake
kernels; the kernel code that runs is the same. Autograd of ``grad_norm_triton`` is registered
in :mod:`lfr_ext.ops`.
"""

from __future__ import annotations

import torch

from .ascent_step import ascent_step_triton
from .grad_norm import SUPPORTED_DTYPES, grad_norm_triton
from .launch import INTERPRETED

__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "ascent_step_op", "grad_norm_op"]


def _ascent_step_fake(x, x_adv, h, g, eps, step_size, lo, hi, q, return_sign_g):
    sign_g = torch.empty_like(x, memory_format=torch.contiguous_format) if return_sign_g else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0]), sign_g


def _grad_norm_fake(g, q):
    return g.new_empty(g.shape[0])


def _register(name, fn, fake):
    if INTERPRETED:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


ascent_step_op = _register("lfr_ext::ascent_step_triton", ascent_step_triton, _ascent_step_fake)
grad_norm_op = _register("lfr_ext::grad_norm_triton", grad_norm_triton, _grad_norm_fake)
