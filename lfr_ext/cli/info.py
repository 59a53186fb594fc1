"""``python -m lfr_ext.info``: versions, what was compiled, and what runs on this machine."""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from .. import _extension, ops
from .._version import __version__


def report() -> str:
    status = _extension.status()
    info = status.build_info
    lines = [
        f"lfr_ext {__version__}",
        f"python {platform.python_version()} on {platform.machine()} {platform.system()}",
        f"torch running: {torch.__version__} (CUDA {torch.version.cuda})",
        f"torch built against: {info.get('torch_version', 'unknown (no build_info.json)')}"
        f" (CUDA {info.get('torch_cuda_version')}, cxx11 ABI {info.get('cxx11_abi')})",
        f"compiled library: {'loaded from ' + status.path if status.loaded else 'not loaded: ' + str(status.error)}",
        f"  C++ CPU sources: {', '.join(info.get('cpu_sources', [])) or '-'}",
        f"  CUDA sources: {', '.join(info.get('cuda_sources', [])) or '- (CPU-only build)'}",
        f"  CUDA archs: {info.get('cuda_arch_list') or '-'}, nvcc {info.get('nvcc_version') or '-'}",
        f"triton: {_module_version('triton')}",
        f"CUDA devices: {torch.cuda.device_count()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
    ]
    from ..hvp import AUTO_DECLINED_CLASSES, HVP_METHODS
    from ..linearized import SUPPORTED_OPS

    lines.append(
        f"hvp methods: {', '.join(HVP_METHODS)}; auto -> linearized for the default cross-entropy on "
        f"models built from the {len(SUPPORTED_OPS)} covered op spellings, else double_backprop "
        "(logger 'lfr_ext' at DEBUG reports each pick)"
    )
    declined = "; ".join(f"{op_class} ({reason})" for op_class, reason in AUTO_DECLINED_CLASSES.items())
    lines.append(f"  auto leaves to double backprop: {declined or 'no op class (linearized wherever it is exact)'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        live = ops.available_impls(device)
        lines.append(f"live implementations on {device}: {', '.join(live)} (auto -> {live[0]})")
    return "\n".join(lines)


def _module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    module = __import__(name)
    return getattr(module, "__version__", "installed")


def main(argv: list[str] | None = None) -> int:
    """Print :func:`report` (``python -m lfr_ext.info``); ``argv`` is ignored, as the other
    commands' ``main(argv)`` take one."""
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
