"""Triton kernels of lfr_ext (installed as ``lfr_ext.kernels``).

One module per op of :data:`lfr_ext.ops.OPS`, named after it (:func:`op_module`), holding the
op's ``@triton.jit`` kernels, its launcher ``<op>_triton`` and its kernels' ahead-of-time
variants ``AOT`` (:mod:`.aot`):

* :mod:`.ascent_step` - fused LFR ascent update + per-sample norm (``_ascent_step_fwd_kernel``)
* :mod:`.grad_norm` - per-sample norm (``_grad_norm_fwd_kernel``)
* :mod:`.registration` - every launcher registered as ``lfr_ext::<op>_triton``

Importing the modules imports triton; :mod:`lfr_ext.ops` does so only when Triton can run
(a CUDA GPU, or ``TRITON_INTERPRET=1`` for CPU tensors). How the op layer fits together, and
what adding an op takes: ``kernels/README.md``.
"""

import importlib


def op_module(op_name: str):
    """The module ``kernels/<op_name>.py`` of the op ``lfr_ext::<op_name>_triton``."""
    return importlib.import_module(f"{__name__}.{op_name}")
