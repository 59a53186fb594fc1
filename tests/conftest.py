"""Hooks of the test run: GPU marks on the cuda variants, slow tests skipped unless selected,
skipped GPU tests failed under LFR_EXT_REQUIRE_GPU=1, and one seed per test. The markers are
declared in pyproject.toml; the helpers the tests import are in tests/utils.py."""

import pytest
import torch

from tests.utils import HAS_CUDA, REQUIRE_GPU


def pytest_configure(config):
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


@pytest.fixture
def exact_fp32():
    """TF32 off for parity checks, restored afterwards (the flags are process-global)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
