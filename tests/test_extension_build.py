"""The installed library was built against the running torch; import never needs it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lfr_ext
from lfr_ext import _extension
from tests.utils import REQUIRE_COMPILED, requires_cuda

COMPILED_OPS = tuple(spec.compiled for spec in lfr_ext.ops.OPS)


def test_installed_library_built_against_running_torch():
    status = _extension.status()
    if not status.loaded and not REQUIRE_COMPILED:
        pytest.skip(f"compiled library not loaded: {status.error}")
    assert status.loaded, status.error
    assert status.build_info["torch_version"] == torch.__version__
    assert status.build_info["cxx11_abi"] == torch._C._GLIBCXX_USE_CXX11_ABI
    assert hasattr(torch.ops.lfr_ext, "ascent_step")
    assert "cpu" in lfr_ext.ops.available_impls("cpu")


@requires_cuda
def test_cuda_sources_compiled_for_this_gpu():
    """On a GPU the library must hold the CUDA kernels, built for this GPU's architecture (or
    as PTX for an older one that the driver can JIT)."""
    status = _extension.status()
    assert status.loaded, status.error
    assert status.with_cuda and status.build_info["cuda_sources"], (
        f"the compiled library has no CUDA kernels (build_info {status.build_info}); rebuild with a CUDA toolkit "
        "(LFR_EXT_BUILD_CUDA=1 makes its absence an error)"
    )
    for op in COMPILED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
    major, minor = torch.cuda.get_device_capability()
    archs = status.build_info["cuda_arch_list"].replace(" ", ";").split(";")
    native = f"{major}.{minor}" in (a.removesuffix("+PTX") for a in archs)
    ptx = any(
        a.endswith("+PTX") and tuple(map(int, a.removesuffix("+PTX").split("."))) <= (major, minor) for a in archs
    )
    assert native or ptx, f"built for {archs}, but this GPU is sm_{major}{minor}"
    assert "cuda" in lfr_ext.ops.available_impls("cuda")


def test_library_for_other_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_extension, "_read_build_info", lambda: {"torch_version": "1.0.0"})
    monkeypatch.setattr(_extension, "_find_library", lambda: "/nonexistent/_C.so")
    result = _extension._try_load()
    assert not result.loaded
    assert "built for torch 1.0.0" in result.error and torch.__version__ in result.error


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_import_and_penalty_without_library():
    code = (
        "import torch, lfr_ext\n"
        "from lfr_ext.models import SmallCNN\n"
        "m = SmallCNN(zero_init_last=False)\n"
        "p = lfr_ext.flatness_penalty(m, torch.rand(2,1,28,28), torch.tensor([1,2]),\n"
        "                             eps=0.1, step_size=0.01, steps=2)\n"
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


def test_uninstalled_source_tree_names_the_missing_install(tmp_path):
    """Importing the package from a checkout that was never installed: the Triton kernels
    (``kernels/`` in the repository, ``lfr_ext.kernels`` once installed) are missing, and the
    reason says so and how to fix it, instead of a bare "triton unavailable"."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = tmp_path / "checkout"
    for part in ("lfr_ext", "kernels"):
        shutil.copytree(os.path.join(root, part), checkout / part, ignore=shutil.ignore_patterns("__pycache__", "_C*"))
    code = (
        "import sys\n"
        # what an editable install adds to the import system maps lfr_ext.kernels; a plain
        # checkout has none of it
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import torch, lfr_ext\n"
        "assert lfr_ext.__file__.startswith(sys.argv[1]), lfr_ext.__file__\n"
        "print(lfr_ext._impl.unavailable_reason('triton', torch.device('cpu')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(checkout)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=checkout,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(checkout)},
    )
    assert out.returncode == 0, out.stderr
    assert "without being installed" in out.stdout and "pip install --no-build-isolation -e ." in out.stdout, out.stdout
