"""What the tests share about the machine they run on: which devices there are, which paths a
run requires, and the marks of a GPU test.

``LFR_EXT_REQUIRE_GPU=1`` (``scripts/gpu_check.sh`` sets it): the run exists to prove the GPU
paths, so a GPU test that skips is a failure (it proved nothing, see ``tests/conftest.py``), and
so is a machine without a GPU. ``LFR_EXT_REQUIRE_COMPILED=1`` (CI): the C++ kernels must be live.
"""

import os

import pytest
import torch

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
