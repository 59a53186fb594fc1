"""Compile every Triton kernel variant of lfr_ext ahead of time for NVIDIA GPUs, with no GPU:
``python tests/triton_aot_check.py [arch ...]`` (default 90 80). Exits non-zero on the first
failure. Run by test_triton_ops.py in a subprocess with TRITON_INTERPRET=0, because under the
interpreter ``@triton.jit`` yields interpreter functions that cannot be compiled."""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lfr_ext.kernels.ascent_step import _ascent_step_fwd_kernel
from lfr_ext.kernels.grad_norm import _grad_norm_fwd_kernel

DTYPES = ("fp32", "bf16", "fp16")
QS = (1, 2, -1)


def variants():
    """(kernel, signature, constexprs, num_warps) covering every dtype, q and flag once."""
    for dtype, q in itertools.product(DTYPES, QS):
        p = f"*{dtype}"
        sig = dict(X=p, X_ADV=p, H=p, G=p, X_NEW=p, SIGN_G=p, G_NORM=p, PARTIAL="*fp32", per_sample="i64",
                   chunk_len="i64", eps="fp32", step_size="fp32", lo="fp32", hi="fp32")
        flags = [(True, False, False), (False, True, True)]  # (WRITE_SIGN, ROUND_SCALARS, SPLIT)
        for write_sign, round_scalars, split in flags:
            const = dict(Q=q, WRITE_SIGN=write_sign, ROUND_SCALARS=round_scalars, SPLIT=split, BLOCK=2048)
            yield _ascent_step_fwd_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const, 8
        for split in (False, True):
            sig = dict(G=p, OUT=p, PARTIAL="*fp32", per_sample="i64", chunk_len="i64")
            const = dict(Q=q, SPLIT=split, BLOCK=1024)
            yield _grad_norm_fwd_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const, 4


def main(archs: list[int]) -> None:
    start = time.perf_counter()
    count = 0
    for arch in archs:
        for kernel, signature, constexprs, num_warps in variants():
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            assert compiled.asm["cubin"], (kernel, constexprs)
            count += 1
    print(f"compiled {count} Triton kernel variants for sm_{archs} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90, 80])
