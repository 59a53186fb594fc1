"""pytest hooks of the benchmark suites: the environment (:func:`bench.utils.environment`) in
every JSON's ``machine_info``.

Run ``pytest bench/ --benchmark-only`` (add ``--benchmark-json=bench/results/<gpu>-<date>.json``
to keep the numbers); ``LFR_BENCH_TINY=1`` runs every suite at tiny sizes (``bench/utils.py``).
"""

from __future__ import annotations

import pytest
import torch

from bench.utils import BENCH_DEVICE, environment


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lfr_ext_environment"] = environment()


@pytest.fixture
def device():
    return torch.device(BENCH_DEVICE)
