"""The Triton kernels registered as PyTorch operators: for each op ``<name>`` of
:data:`lfr_ext.ops.OPS`, ``lfr_ext::<name>_triton`` is the launcher ``<name>_triton`` of
``kernels/<name>.py``, with the same schema as the C++ op ``lfr_ext::<name>`` and the same fake
kernel and autograd (declared once, in ``lfr_ext/_op_specs.py``).

On a GPU they are ``torch.library.triton_op``s whose kernels are launched through
``wrap_triton``: ``torch.compile`` sees the kernels themselves (and can fuse around them), and
the op body doubles as the fake kernel. Under ``TRITON_INTERPRET=1`` (how CI runs them on CPU
tensors) ``@triton.jit`` returns interpreter functions that ``wrap_triton`` cannot trace, so the
same functions are registered as opaque ``torch.library.custom_op``s with the declared fake
kernels; the kernel code that runs is the same.
"""

from __future__ import annotations

import torch

from .._op_specs import OPS, OpSpec
from . import op_module
from .launch import INTERPRETED, SUPPORTED_DTYPES

__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "TRITON_OPS"]


def _register(spec: OpSpec):
    launcher = getattr(op_module(spec.name), f"{spec.name}_triton")
    if INTERPRETED:
        op = torch.library.custom_op(spec.triton, launcher, mutates_args=())
        spec.register(op)
    else:
        op = torch.library.triton_op(spec.triton, launcher, mutates_args=())
        spec.register(op, fake=False)
    return op


# op name -> its registered Triton twin
TRITON_OPS = {spec.name: _register(spec) for spec in OPS}
