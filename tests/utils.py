"""What the tests share: the machine they run on (which devices there are, which paths a run
requires, the marks of a GPU test and of an optional dependency) and the comparisons of the
engines against double backprop.

``LFR_EXT_REQUIRE_GPU=1`` (``scripts/gpu_check.sh`` sets it): the run exists to prove the GPU
paths, so a GPU test that skips is a failure (it proved nothing, see ``tests/conftest.py``), and
so is a machine without a GPU. ``LFR_EXT_REQUIRE_COMPILED=1`` (CI): the C++ kernels must be live.
"""

import importlib.util
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lfr_ext.data import FASHION_MNIST_DIR
from lfr_ext.evaluation.attacks import INSTALL_COMMAND

REQUIRE_GPU = os.environ.get("LFR_EXT_REQUIRE_GPU", "0") == "1"
REQUIRE_COMPILED = os.environ.get("LFR_EXT_REQUIRE_COMPILED", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# `pytest -m cuda` selects the GPU tests: those marked with CUDA_MARKS (or @requires_cuda) and
# the cuda variants of every test parametrised over `device` (tests/conftest.py marks those).
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def requires_cuda(test):
    for mark in reversed(CUDA_MARKS):
        test = mark(test)
    return test


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
HAVE_FASHION_MNIST = all(os.path.exists(os.path.join(FASHION_MNIST_DIR, name)) for name in FASHION_MNIST_FILES)
# The tests that read Fashion-MNIST from disk carry the `fashion_mnist` mark, so that a run on a
# machine without it leaves them out by name (`-m "not fashion_mnist"`, scripts/gpu_check.sh)
# instead of skipping them, which LFR_EXT_REQUIRE_GPU=1 counts as a failure.
FASHION_MNIST_MARKS = [
    pytest.mark.fashion_mnist,
    pytest.mark.skipif(
        not HAVE_FASHION_MNIST,
        reason=f"needs Fashion-MNIST in {FASHION_MNIST_DIR} (Debian's "
        "dataset-fashion-mnist; scripts/install.sh installs it)",
    ),
]


def needs_fashion_mnist(test):
    for mark in reversed(FASHION_MNIST_MARKS):
        test = mark(test)
    return test


HAVE_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None
needs_torchattacks = pytest.mark.skipif(
    not HAVE_TORCHATTACKS, reason=f"torchattacks not installed (optional extra; CI installs it: {INSTALL_COMMAND})"
)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def double_vjp_jvp(model, x, v, seed):
    """J v by the double-VJP trick, an independent oracle (same Dropout masks via the seed;
    attention on its twice-differentiable math backend)."""
    torch.manual_seed(seed)
    x = x.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        out = model(x)
    u = torch.zeros_like(out, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, u, create_graph=True)
    (jv,) = torch.autograd.grad(gx, u, v)
    return jv


def assert_grads_close(got, expected, rtol):
    """Per parameter ``||a - b|| <= rtol ||b||``, except that parameters whose true gradient is
    0 (a conv bias before train-mode BatchNorm) are held to rounding of the overall scale."""
    scale = torch.sqrt(sum((b.norm() ** 2 for b in expected if b is not None), torch.tensor(0.0, dtype=torch.float64)))
    floor = 64 * torch.finfo(expected[0].dtype).eps * scale
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if b is not None:
            assert (a - b).norm() <= rtol * b.norm() + floor, ((a - b).norm(), b.norm())


def params_grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
