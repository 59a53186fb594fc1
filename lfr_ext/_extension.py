"""Loading of the compiled library ``lfr_ext/_C*.so``.

``import lfr_ext`` never requires the library. It is loaded with ``torch.ops.load_library``
(its static initialisers register the ``lfr_ext::*`` kernels with the dispatcher) only when
``build_info.json`` says it was compiled against the running torch: PyTorch's C++ ABI is not
promised across versions, so a library built for another torch could crash instead of
failing cleanly. Any problem is reported once, as a warning, and lfr_ext falls back to the
pure-PyTorch implementations.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class ExtensionStatus:
    """What happened when lfr_ext tried to load its compiled library."""

    loaded: bool
    path: str | None = None
    build_info: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def with_cuda(self) -> bool:
        return self.loaded and bool(self.build_info.get("with_cuda"))


def _read_build_info() -> dict:
    try:
        with open(os.path.join(_PACKAGE_DIR, "build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _find_library() -> str | None:
    candidates = sorted(
        glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd"))
    )
    return candidates[0] if candidates else None


def _try_load() -> ExtensionStatus:
    if os.environ.get("LFR_EXT_DISABLE_EXTENSION", "0") == "1":
        return ExtensionStatus(False, error="disabled by LFR_EXT_DISABLE_EXTENSION=1")
    path = _find_library()
    info = _read_build_info()
    if path is None:
        return ExtensionStatus(
            False,
            build_info=info,
            error="compiled library lfr_ext/_C not found (install with `pip install --no-build-isolation .`)",
        )
    built_for = info.get("torch_version")
    if built_for != torch.__version__:
        return ExtensionStatus(
            False,
            path,
            info,
            error=f"compiled library was built for torch {built_for}, but torch {torch.__version__} is running; "
            "rebuild with `pip install --no-build-isolation .`",
        )
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return ExtensionStatus(False, path, info, error=f"loading {path} failed: {exc}")
    return ExtensionStatus(True, path, info)


# Once per process: a shared library is loaded once (its TORCH_LIBRARY registrations cannot be repeated).
@functools.lru_cache(maxsize=None)
def status() -> ExtensionStatus:
    """Load the library on first use (once) and report what happened; warns once on failure,
    unless the library is simply absent because it was never built."""
    result = _try_load()
    if not result.loaded and result.path is not None:
        warnings.warn(f"lfr_ext: {result.error}; using the pure-PyTorch fallback.", RuntimeWarning, stacklevel=3)
    return result


def is_loaded() -> bool:
    return status().loaded
