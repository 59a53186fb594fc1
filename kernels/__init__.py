"""Triton kernels of lfr_ext (installed as ``lfr_ext.kernels``).

* :mod:`.ascent_step` - fused LFR ascent update + per-sample norm (``_ascent_step_fwd_kernel``)
* :mod:`.grad_norm` - per-sample norm (``_grad_norm_fwd_kernel``)
* :mod:`.ops` - both registered as ``lfr_ext::ascent_step_triton`` / ``lfr_ext::grad_norm_triton``

Importing this package imports triton; :mod:`lfr_ext.ops` does so only when Triton can run
(a CUDA GPU, or ``TRITON_INTERPRET=1`` for CPU tensors).
"""
