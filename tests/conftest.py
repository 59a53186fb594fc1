import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: expensive checks (large tensors, long runs); run with -m slow")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REQUIRE_COMPILED = os.environ.get("LFR_EXT_REQUIRE_COMPILED", "0") == "1"
