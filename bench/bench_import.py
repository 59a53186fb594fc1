"""Import cost: ``import lfr_ext`` (the library) against ``import lfr_ext.training`` (the harness).

Each round runs in a fresh interpreter that first imports torch, untimed (every user of lfr_ext
pays it anyway), then waits for the benchmark's signal on stdin and imports the module. The
benchmark times from that signal to the child's answer (the child's exit is not timed), so its
statistics are the module's own import plus a pipe round trip (microseconds); ``extra_info`` keeps
the child's own ``time.perf_counter()`` figure (``child_seconds``, per timed round, and its
median) and how many lfr_ext modules the import loaded (more under ``TRITON_INTERPRET=1``, which
loads the Triton kernels). tests/test_import_boundary.py checks which modules load; the
time is only measured here.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

from bench.utils import BENCH_DEVICE, TINY, environment

# What the child runs: torch first (not timed), then the timed import of {module} on the signal.
CHILD = """
import sys, time
import torch
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
count = sum(1 for m in sys.modules if m == "lfr_ext" or m.startswith("lfr_ext."))
sys.stdout.write(f"{{seconds!r}} {{count}}\\n"); sys.stdout.flush()
"""

# module -> what it stands for
MODULES = {"lfr_ext": "library", "lfr_ext.training": "harness"}


def _start_child(module: str, children: list) -> tuple:
    """A fresh interpreter with torch imported, waiting to import ``module``: pedantic's setup."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(module=module)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    children.append(child)
    ready = child.stdout.readline()
    assert ready == "ready\n", f"the child did not start: {ready!r}"
    return (child,), {}


def _import_in(child: subprocess.Popen, figures: list) -> None:
    """The timed part: signal ``child`` and read its answer (its exit is awaited after the rounds)."""
    child.stdin.write("go\n")
    child.stdin.flush()
    answer = child.stdout.readline()
    seconds, count = answer.split()
    figures.append((float(seconds), int(count)))


@pytest.mark.parametrize("module", list(MODULES))
def test_import_after_torch(benchmark, module):
    figures: list[tuple[float, int]] = []
    children: list[subprocess.Popen] = []
    benchmark.group = f"import after torch ({BENCH_DEVICE} machine)"
    rounds, warmup_rounds = (1, 0) if TINY else (5, 1)
    benchmark.pedantic(
        lambda child: _import_in(child, figures),
        setup=lambda: _start_child(module, children),
        rounds=rounds,
        iterations=1,
        warmup_rounds=warmup_rounds,
    )
    for child in children:
        child.stdin.close()
        assert child.wait(timeout=300) == 0, f"a child importing {module} failed"
    seconds = [s for s, _ in figures[warmup_rounds:]]
    benchmark.extra_info.update(
        environment(),
        module=module,
        part=MODULES[module],
        lfr_ext_modules=figures[-1][1],
        child_seconds=seconds,
        child_seconds_median=statistics.median(seconds),
    )
