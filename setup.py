"""Build script for lfr_ext.

The compiled library `lfr_ext/_C.so` holds the C++ CPU kernels and, when possible, their
CUDA twins. It is compiled against the torch that is importable here, so install with

    pip install --no-build-isolation .        # builds against the torch you already have

(plain `pip install .` also works: the in-tree backend `_build/backend.py` pins the build
environment's torch to the version installed in the target environment).

Environment switches:
  LFR_EXT_BUILD_CUDA   auto (default) | 0 | 1. auto compiles csrc/cuda/*.cu when torch is a
                       CUDA build and nvcc is found (CUDA_HOME); no GPU is needed to compile.
                       1 makes a missing toolkit an error; 0 builds the CPU library only.
  TORCH_CUDA_ARCH_LIST architectures for the CUDA sources; default "8.0;9.0+PTX"
                       (A100, H100/H200, PTX for newer GPUs).
  MAX_JOBS             parallel compile jobs for ninja.
  DEBUG=1              -O0 -g.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only by a broken install command
    raise RuntimeError(
        "lfr_ext compiles its C++ library against the installed PyTorch, and none was found.\n"
        "Install torch first, then build against it:\n"
        "    pip install torch ninja setuptools && pip install --no-build-isolation .\n"
    ) from exc


def _cuda_build_wanted() -> bool:
    """Decide whether to compile the CUDA sources (never from torch.cuda.is_available())."""
    mode = os.environ.get("LFR_EXT_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise RuntimeError(f"LFR_EXT_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    have_toolkit = bool(torch.version.cuda) and nvcc is not None and os.path.exists(nvcc)
    if mode == "1" and not have_toolkit:
        raise RuntimeError(
            "LFR_EXT_BUILD_CUDA=1 but no usable CUDA toolkit: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
            "Point CUDA_HOME at the toolkit (the directory holding bin/nvcc)."
        )
    return have_toolkit


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    for token in out.stdout.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return None


def _extra_cuda_include_dirs() -> list[str]:
    """Headers a CUDA torch wheel ships outside the toolkit (cuBLAS/cuSPARSE from nvidia-* wheels)."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _openmp_flags() -> list[str]:
    """at::parallel_for is a header template: the C++ kernels run in parallel only when they are
    compiled with the OpenMP that ATen uses (as pytorch_scatter does). The GOMP symbols resolve to
    the runtime torch already loads, so nothing is added at link time."""
    info = torch.__config__.parallel_info()
    if sys.platform.startswith("linux") and "backend: OpenMP" in info and "OpenMP not found" not in info:
        return ["-fopenmp"]
    return []


def make_extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + _openmp_flags()
    sources = ["csrc/lfr_ext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    with_cuda = _cuda_build_wanted()
    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.version.split()[0],
        "with_cuda": with_cuda,
        "cpu_sources": sources[1:],
        "cuda_sources": [],
        "cuda_arch_list": None,
        "nvcc_version": None,
    }
    if not with_cuda:
        ext = CppExtension("lfr_ext._C", sources, extra_compile_args={"cxx": cxx_flags})
        return ext, info

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    info.update(
        cuda_sources=cuda_sources, cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], nvcc_version=_nvcc_version()
    )
    # No --use_fast_math: the kernels mirror PyTorch's rounding and need IEEE sqrt and denormals.
    nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
    ext = CUDAExtension(
        "lfr_ext._C",
        sources + cuda_sources,
        include_dirs=_extra_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags + ["-lineinfo"]},
    )
    return ext, info


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, which also writes `lfr_ext/build_info.json` wherever it puts the library:
    the build directory (what a wheel holds) and, for an in-place or editable build, the source
    tree. `import lfr_ext` reads it to refuse a library built for another torch."""

    def run(self):
        super().run()
        text = json.dumps(build_info, indent=2) + "\n"
        dirs = {os.path.join(self.build_lib, "lfr_ext")}
        if self.inplace:
            dirs.add(self.get_finalized_command("build_py").get_package_dir("lfr_ext"))
        for d in sorted(dirs):
            os.makedirs(d, exist_ok=True)
            Path(d, "build_info.json").write_text(text)


extension, build_info = make_extension()

setup(
    packages=find_packages(include=["lfr_ext", "lfr_ext.*"]) + ["lfr_ext.kernels"],
    package_dir={"lfr_ext.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
)
