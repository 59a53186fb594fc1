"""Which implementation of an ``lfr_ext`` op runs: availability, ``auto``'s order, and errors.

``impl`` is one of :data:`IMPLS`: ``reference`` (always available), ``cpu`` (CPU tensors) and
``cuda`` (CUDA tensors) when the compiled library is loaded, ``triton`` for fp32/bf16/fp16 CUDA
tensors, or CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
``import lfr_ext`` (a testing aid: correct but slow), and ``auto``: the first available in
``AUTO_ORDER`` for the device. Where each implementation lives: ``kernels/README.md``.

``AUTO_ORDER`` is fastest first. On CUDA the compiled kernel comes first; on the CPU the C++
kernel, then the eager chain, and the Triton interpreter last (it exists to test the Triton
kernels without a GPU, and is orders of magnitude slower). ``impl=None`` reads
``LFR_EXT_IMPL``; an explicitly requested implementation that cannot run raises with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _extension

IMPLS = ("auto", "triton", "cuda", "cpu", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference", "triton")}


# Once per process: importing the kernels registers torch.library ops, which cannot be registered twice.
@functools.lru_cache(maxsize=None)
def triton_kernels():
    """The registered Triton ops (module :mod:`lfr_ext.kernels.registration`), or the reason they cannot
    run here as a string. Imported once, and only where Triton can run at all."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'lfr_ext[triton]')"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpreted and not torch.cuda.is_available():
        return "Triton needs a CUDA GPU here (or TRITON_INTERPRET=1 for CPU tensors, set before importing lfr_ext)"
    if interpreted:
        import numpy
        import triton

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem is not None:
            return problem
    try:
        from .kernels import registration as kernel_ops
    except ModuleNotFoundError as exc:
        if exc.name == __package__ + ".kernels":
            return _not_installed_reason()
        return f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken triton install must not break `import lfr_ext`
        return f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    return kernel_ops


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    Before Triton 3.7 the interpreter turns a scalar into an index with ``int()`` of a
    one-element array, which numpy 2.4 removed, so every loop over a runtime bound fails
    inside the kernel with ``TypeError: only 0-dimensional arrays can be converted to Python
    scalars``. Compiled kernels on a GPU are not affected."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy {numpy_version}: "
            "install numpy<2.4 or triton>=3.7"
        )
    return None


def _not_installed_reason() -> str:
    """Why ``lfr_ext.kernels`` is missing: the Triton kernels are the top-level ``kernels/``
    directory of the repository, which only an install maps to ``lfr_ext.kernels``
    (``package_dir`` in setup.py). Importing ``lfr_ext`` from an uninstalled checkout (a
    ``PYTHONPATH`` pointing at it, or its root as the working directory) cannot see them."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    kernels_dir = os.path.join(os.path.dirname(package_dir), "kernels")
    where = f"; the kernels are in {kernels_dir}" if os.path.isdir(kernels_dir) else ""
    return (
        f"lfr_ext was imported from {package_dir} without being installed, so lfr_ext.kernels (the Triton "
        f"kernels) does not exist{where}: install the checkout with `pip install --no-build-isolation -e .`"
    )


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when ``impl`` can run on ``device`` (and ``dtype``, if given), else why not."""
    device = torch.device(device)
    if impl == "reference":
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, got {device}"
        return None if _extension.is_loaded() else _extension.status().error
    if impl == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, got {device}"
        if not _extension.is_loaded():
            return _extension.status().error
        return None if _extension.status().with_cuda else "the compiled library was built without CUDA sources"
    if impl == "triton":
        kernels = triton_kernels()
        if isinstance(kernels, str):
            return kernels
        if device.type == "cpu" and not kernels.INTERPRETED:
            return "Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 before importing lfr_ext)"
        if device.type not in ("cpu", "cuda"):
            return f"the Triton kernels take CUDA tensors, got {device}"
        if dtype is not None and dtype not in kernels.SUPPORTED_DTYPES:  # declared once, beside the kernels
            return f"the Triton kernels take {_dtype_names(kernels.SUPPORTED_DTYPES)}, got {dtype}"
        return None
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _dtype_names(dtypes) -> str:
    """(float32, bfloat16, float16) -> "fp32, bf16 and fp16"."""
    names = [str(d).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp") for d in dtypes]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def available_impls(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Implementations that can run on ``device`` (and ``dtype``) here, in ``auto``'s order."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    return [impl for impl in order if unavailable_reason(impl, device, dtype) is None]


# torch.compile runs the choice once, while tracing, and bakes the answer into the graph
# (it depends only on the environment, the device and the dtype, never on tensor values).
@torch.compiler.assume_constant_result
def resolve_impl(impl: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``impl`` (or ``$LFR_EXT_IMPL``, or ``auto``) into a concrete implementation."""
    requested = impl if impl is not None else os.environ.get("LFR_EXT_IMPL", "auto")
    if requested not in IMPLS:
        source = "impl" if impl is not None else "LFR_EXT_IMPL"
        raise ValueError(f"{source} must be one of {IMPLS}, got {requested!r}")
    if requested == "auto":
        return available_impls(device, dtype)[0]
    reason = unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise RuntimeError(f"lfr_ext: impl={requested!r} is not available on {torch.device(device)}: {reason}")
    return requested
