"""The installed library was built against the running torch; import never needs it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lfr_ext
from lfr_ext import _extension

from conftest import REQUIRE_COMPILED


def test_installed_library_built_against_running_torch():
    status = _extension.status()
    if not status.loaded and not REQUIRE_COMPILED:
        pytest.skip(f"compiled library not loaded: {status.error}")
    assert status.loaded, status.error
    assert status.build_info["torch_version"] == torch.__version__
    assert status.build_info["cxx11_abi"] == torch._C._GLIBCXX_USE_CXX11_ABI
    assert hasattr(torch.ops.lfr_ext, "ascent_step")
    assert "cpu" in lfr_ext.ops.available_impls("cpu")


def test_library_for_other_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_extension, "_read_build_info", lambda: {"torch_version": "1.0.0"})
    monkeypatch.setattr(_extension, "_find_library", lambda: "/nonexistent/_C.so")
    result = _extension._try_load()
    assert not result.loaded
    assert "built for torch 1.0.0" in result.error and torch.__version__ in result.error


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_import_and_penalty_without_library():
    code = (
        "import torch, lfr_ext\n"
        "from lfr_ext.models import SmallCNN\n"
        "m = SmallCNN(zero_init_last=False)\n"
        "p = lfr_ext.flatness_penalty(m, torch.rand(2,1,28,28), torch.tensor([1,2]), eps=0.1, step_size=0.01, steps=2)\n"
        "print(lfr_ext.ops.available_impls('cpu'), float(p) > 0)\n"
    )
    out = _run(code, LFR_EXT_DISABLE_EXTENSION="1", TRITON_INTERPRET="0")  # no interpreted Triton either
    assert out.returncode == 0, out.stderr
    assert "['reference'] True" in out.stdout


def test_info_module_reports_versions():
    out = _run("import runpy; runpy.run_module('lfr_ext.info', run_name='__main__')")
    assert out.returncode == 0, out.stderr
    assert f"torch running: {torch.__version__}" in out.stdout
    assert "live implementations on cpu" in out.stdout


def test_mismatched_build_warns_once(tmp_path):
    """A package copy whose build_info names another torch: one warning, library not loaded."""
    import importlib.util
    import shutil
    import warnings

    pkg = tmp_path / "lfr_ext"
    shutil.copytree(os.path.dirname(lfr_ext.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "build_info.json").write_text(json.dumps({"torch_version": "0.0.1"}))
    if not any(p.name.startswith("_C") for p in pkg.iterdir()):
        (pkg / "_C.so").write_bytes(b"")  # a stale library file
    spec = importlib.util.spec_from_file_location("lfr_ext_copy_extension", pkg / "_extension.py")
    copy = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = copy  # dataclasses look their module up there
    try:
        spec.loader.exec_module(copy)
    finally:
        del sys.modules[spec.name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = copy.status(), copy.status()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("lfr_ext: compiled library was built for torch 0.0.1")
    assert not first.loaded and first is second
