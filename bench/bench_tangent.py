"""What one inner LFR step costs with each way of getting the Hessian-vector product, and what
recording the tangent tape costs.

The inner step needs ``g = grad_x sum_i l_i`` and ``h = H v`` at the current point. Providers:

* ``gradient``: one forward + backward (``g`` alone): the unit; the floor of a step is 2 of these;
* ``linearized``: :func:`lfr_ext.hvp.grad_and_hvp_linearized` (recorded forward, backward,
  tangent replay, VJP);
* ``double_backprop``: the authors' ``create_graph=True`` + gradient of a gradient;
* ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad``;
* ``forward``/``forward_recorded``: the forward of an inner step (input requiring grad, grad
  mode on, so autograd builds its graph) plain and under :class:`lfr_ext.linearized.TangentTape`:
  the Python cost of recording. ``extra_info["ops_recorded"]`` must be > 0 (under
  ``torch.no_grad()`` the tape records nothing, which would time nothing).

Setups: SmallCNN (b128, MNIST shapes), ResNet-20, WRN-16-4 with SiLU, the small ConvNeXt and ViT
of :mod:`lfr_ext.models` (CIFAR shapes; b128 on GPU, ``LFR_BENCH_CPU_BATCH`` (default 16) on CPU).
The providers that differentiate attention twice (double backprop, forward-over-reverse) run it on
its math backend, the only one with a double backward; the linearized pass runs PyTorch's default.
``bench/summarize.py`` states each median in gradients: over the ``gradient`` provider's median at
the same setup.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.utils import BENCH_DEVICE, CPU_BATCH, TINY, environment, synchronized
from lfr_ext.hvp import grad_and_hvp_forward, grad_and_hvp_linearized
from lfr_ext.linearized import TangentTape
from lfr_ext.models import ConvNeXtCifar, ResNet20, SmallCNN, ViTCifar, WideResNet
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop, input_gradient

ON_GPU = BENCH_DEVICE == "cuda"
SETUPS = {
    "smallcnn_b128": (lambda: SmallCNN(zero_init_last=False), (1, 28, 28), 4 if TINY else 128),
    "resnet20": (ResNet20, (3, 32, 32), 4 if TINY else (128 if ON_GPU else CPU_BATCH)),
    # Smooth activations: the linear maps depend on x, so the HVP differentiates the tangent itself.
    "wrn16_4_silu": (
        lambda: WideResNet(16, 4, activation="silu"),
        (3, 32, 32),
        4 if TINY else (128 if ON_GPU else CPU_BATCH),
    ),
    # Normalisation layers, GELU and (ViT) attention.
    "convnext_tiny": (ConvNeXtCifar, (3, 32, 32), 4 if TINY else (128 if ON_GPU else CPU_BATCH)),
    "vit_tiny": (lambda: ViTCifar(image_size=32), (3, 32, 32), 4 if TINY else (128 if ON_GPU else CPU_BATCH)),
}


def setup_gradient(model, x, y):
    return lambda: input_gradient(model, x.detach().requires_grad_(True), y, default_loss, create_graph=False)


def setup_hvp(grad_and_hvp, model, x, y):
    return lambda: grad_and_hvp(model, x, y, default_loss, 1)


def setup_hvp_twice_differentiable(grad_and_hvp, model, x, y):
    def fn():
        with sdpa_kernel(SDPBackend.MATH):
            return grad_and_hvp(model, x, y, default_loss, 1)

    return fn


def setup_forward(model, x, y):
    def fn():
        source = x.detach().requires_grad_(True)
        return F.cross_entropy(model(source), y)

    return fn


def setup_forward_recorded(model, x, y):
    """The forward under a tangent tape; ``fn.ops_recorded`` is how many ops the last call recorded."""

    def fn():
        source = x.detach().requires_grad_(True)
        with TangentTape(source) as tape:
            logits = model(source)
        fn.ops_recorded = len(tape._program)
        return F.cross_entropy(logits, y)

    return fn


# provider -> factory(model, x, y) of the timed call
PROVIDERS = {
    "gradient": setup_gradient,
    "linearized": functools.partial(setup_hvp, grad_and_hvp_linearized),
    "double_backprop": functools.partial(setup_hvp_twice_differentiable, grad_and_hvp_double_backprop),
    "forward_over_reverse": functools.partial(setup_hvp_twice_differentiable, grad_and_hvp_forward),
    "forward": setup_forward,
    "forward_recorded": setup_forward_recorded,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_inner_step(benchmark, setup, provider):
    factory, shape, batch = SETUPS[setup]
    torch.manual_seed(0)
    model = factory().to(BENCH_DEVICE).eval()
    x = torch.rand(batch, *shape, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (batch,), device=BENCH_DEVICE)
    fn = PROVIDERS[provider](model, x, y)

    benchmark.group = f"inner step {setup} b{batch} ({BENCH_DEVICE})"
    rounds = 1 if TINY else (10 if ON_GPU else 3)
    benchmark.pedantic(synchronized(fn), rounds=rounds, iterations=1, warmup_rounds=0 if TINY else 1)
    ops_recorded = getattr(fn, "ops_recorded", None)
    if provider == "forward_recorded":
        assert ops_recorded > 0, "the tape recorded nothing: the timing would measure no recording"
    benchmark.extra_info.update(environment(), provider=provider, setup=setup, batch=batch, ops_recorded=ops_recorded)
