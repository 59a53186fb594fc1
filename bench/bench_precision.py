"""Low precision: what TF32 and bf16 autocast do to the inner step, in time and in agreement.

Only ``sign(h)`` drives the ascent, so the figure of merit is the fraction of entries of
``sign(h)`` that agree with an fp64 double-backprop HVP at the same point. For each setting
(``fp32`` with TF32 off, ``tf32``: PyTorch's cuDNN default, ``bf16_autocast``) this times one
linearized inner step and records, in ``extra_info``, the agreement of the linearized HVP and of
the authors' double-backprop HVP under that setting. ``tests/test_linearized_gpu.py`` requires
the first to be no worse than the second; this suite records the figures. TF32 and bf16
autocast are GPU settings: on a CPU only ``fp32`` runs.

Setups: the authors' SmallCNN (MNIST shapes) and ResNet-20 (CIFAR shapes), batch 128 on a GPU.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from bench.utils import BENCH_DEVICE, TINY, environment, synchronized
from lfr_ext.hvp import grad_and_hvp_linearized
from lfr_ext.models import ResNet20, SmallCNN
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop

ON_GPU = BENCH_DEVICE == "cuda"
BATCH = 4 if TINY else (128 if ON_GPU else 16)
SETUPS = {
    "smallcnn_mnist": (lambda: SmallCNN(zero_init_last=False), (1, 28, 28)),
    "resnet20_cifar": (ResNet20, (3, 32, 32)),
}


@contextlib.contextmanager
def precision(tf32: bool, autocast_dtype: torch.dtype | None = None):
    """TF32 on or off for cuDNN and cuBLAS, and autocast to ``autocast_dtype``, restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# setting -> factory() of its context (``tf32`` is PyTorch's cuDNN default)
SETTINGS = {
    "fp32": functools.partial(precision, tf32=False),
    "tf32": functools.partial(precision, tf32=True),
    "bf16_autocast": functools.partial(precision, tf32=False, autocast_dtype=torch.bfloat16),
}


def _agreement(h: torch.Tensor, exact_sign: torch.Tensor) -> float:
    return (torch.sign(h.double()) == exact_sign).double().mean().item()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_inner_step_precision(benchmark, setup, setting):
    if setting != "fp32" and not ON_GPU:
        pytest.skip(f"{setting} is a GPU setting")
    factory, shape = SETUPS[setup]
    torch.manual_seed(0)
    model = factory().to(BENCH_DEVICE).eval()
    x = torch.rand(BATCH, *shape, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=BENCH_DEVICE)
    _, h_exact = grad_and_hvp_double_backprop(model.double(), x.double(), y, default_loss, 1)
    exact_sign = torch.sign(h_exact)
    model.float()
    with SETTINGS[setting]():
        _, h_linearized = grad_and_hvp_linearized(model, x, y, default_loss, 1)
        _, h_double_backprop = grad_and_hvp_double_backprop(model, x, y, default_loss, 1)

        def fn():
            return grad_and_hvp_linearized(model, x, y, default_loss, 1)

        benchmark.group = f"inner step precision {setup} b{BATCH} ({BENCH_DEVICE})"
        benchmark.pedantic(synchronized(fn), rounds=1 if TINY else 10, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info.update(
        environment(),
        setup=setup,
        setting=setting,
        batch=BATCH,
        sign_agreement_linearized=_agreement(h_linearized, exact_sign),
        sign_agreement_double_backprop=_agreement(h_double_backprop, exact_sign),
    )
