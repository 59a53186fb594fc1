import os

import pytest
import torch

# LFR_EXT_REQUIRE_GPU=1 (scripts/gpu_check.sh sets it): the run exists to prove the GPU paths,
# so a GPU test that skips is a failure (it proved nothing), and so is a machine without a GPU.
REQUIRE_GPU = os.environ.get("LFR_EXT_REQUIRE_GPU", "0") == "1"
REQUIRE_COMPILED = os.environ.get("LFR_EXT_REQUIRE_COMPILED", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# `pytest -m cuda` selects the GPU tests: those marked with CUDA_MARKS (or @requires_cuda) and
# the cuda variants of every test parametrised over `device`.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def requires_cuda(test):
    for mark in reversed(CUDA_MARKS):
        test = mark(test)
    return test


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: expensive checks (large tensors, long runs); run with -m slow")
    config.addinivalue_line("markers", "cuda: a GPU test (select them with -m cuda)")
    config.addinivalue_line("markers", "multi_gpu: needs several GPUs (may skip under LFR_EXT_REQUIRE_GPU=1)")
    if REQUIRE_GPU and not HAS_CUDA:
        raise pytest.UsageError("LFR_EXT_REQUIRE_GPU=1, but torch sees no CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    exempt = "slow" in item.keywords or "multi_gpu" in item.keywords
    if REQUIRE_GPU and report.skipped and "cuda" in item.keywords and not exempt:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"LFR_EXT_REQUIRE_GPU=1 and this GPU test was skipped: {reason}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
