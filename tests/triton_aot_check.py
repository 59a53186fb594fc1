"""Compile every Triton kernel variant of lfr_ext ahead of time for NVIDIA GPUs, with no GPU:
``python tests/triton_aot_check.py [arch ...]`` (default 90 80). Exits non-zero on the first
failure. Run by test_triton_aot.py in a subprocess with TRITON_INTERPRET=0, because under the
interpreter ``@triton.jit`` yields interpreter functions that cannot be compiled.

The variants are the ``AOT`` matrices that each op's ``kernels/<op>.py`` declares beside its
kernels (``kernels/aot.py``), for every op of :data:`lfr_ext.ops.OPS`."""

from __future__ import annotations

import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lfr_ext.kernels.aot import AotVariant, op_matrices
from lfr_ext.ops import OPS


def variants() -> list[AotVariant]:
    """Every declared variant, once (:func:`main` compiles each for every architecture)."""
    return [variant for spec in OPS for matrix in op_matrices(spec.name) for variant in matrix.variants()]


def main(archs: list[int]) -> None:
    start = time.perf_counter()
    count = 0
    for arch in archs:
        for v in variants():
            source = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
            assert compiled.asm["cubin"], (v.kernel, v.constexprs)
            count += 1
    print(f"compiled {count} Triton kernel variants for sm_{archs} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90, 80])
