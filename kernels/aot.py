"""Ahead-of-time compile matrices of the Triton kernels, declared beside each kernel.

``kernels/<op>.py`` declares ``AOT``: one :class:`AotMatrix` for each ``@triton.jit`` kernel it
defines. ``tests/triton_aot_check.py`` compiles every variant for NVIDIA GPUs with no GPU
present, so that code only a real GPU rejects (the interpreter, which CI runs, accepts more)
fails in CI. A matrix is checked against its kernel's arguments, so a kernel that gains or
loses an argument cannot drift from its declaration unnoticed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import triton.language as tl

from .._op_specs import Q_CODES
from . import op_module
from .launch import num_warps_for

STORAGE = "*storage"  # argument type: a pointer to the inputs' dtype (one variant per dtype)


@dataclass(frozen=True)
class AotVariant:
    """One compilation: ``ASTSource(kernel, signature, constexprs)`` with ``num_warps``."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int


@dataclass(frozen=True)
class AotMatrix:
    """The variants of ``kernel`` to compile: ``dtypes x Q_CODES x flags``, each with
    ``BLOCK=block`` and the warps :func:`.launch.plan_launch` gives that block.

    ``arg_types`` maps each runtime argument to its Triton type (``"i64"``, ``"fp32"``,
    ``"*fp32"`` or :data:`STORAGE`). ``flags`` are combinations of the kernel's other
    constexprs, chosen so that each constexpr takes each of its values at least once.
    """

    kernel: Any  # a @triton.jit function (an interpreter function under TRITON_INTERPRET=1)
    dtypes: tuple[torch.dtype, ...]
    arg_types: Mapping[str, str]
    flags: tuple[Mapping[str, Any], ...]
    block: int

    def variants(self) -> list[AotVariant]:
        """One variant per (dtype, q, flags), in that order."""
        out = []
        for dtype, q, flags in itertools.product(self.dtypes, Q_CODES, self.flags):
            self._check_covers_arguments([*self.arg_types, "Q", *flags, "BLOCK"])
            storage = "*" + triton_type(dtype)
            constexprs = {"Q": q, **flags, "BLOCK": self.block}
            types = {name: storage if t == STORAGE else t for name, t in self.arg_types.items()}
            # In the kernel's argument order, as ASTSource binds the signature to its parameters.
            signature = {name: "constexpr" if name in constexprs else types[name] for name in self.kernel.arg_names}
            constexprs = {name: constexprs[name] for name in self.kernel.arg_names if name in constexprs}
            out.append(AotVariant(self.kernel, signature, constexprs, num_warps_for(self.block)))
        return out

    def _check_covers_arguments(self, declared: list[str]) -> None:
        """Each of the kernel's arguments declared exactly once (a type, Q, a flag or BLOCK)."""
        taken = list(self.kernel.arg_names)
        if sorted(declared) != sorted(taken):
            undeclared = sorted(set(taken) - set(declared))
            unknown = sorted(set(declared) - set(taken))
            twice = sorted({name for name in declared if declared.count(name) > 1})
            raise ValueError(
                f"the AOT matrix of {self.kernel.fn.__name__} does not match its arguments {taken}: "
                f"undeclared {undeclared}, unknown {unknown}, declared twice {twice}"
            )


def triton_type(dtype: torch.dtype) -> str:
    """torch.float32 -> "fp32", torch.bfloat16 -> "bf16", torch.float16 -> "fp16"."""
    return str(getattr(tl, str(dtype).removeprefix("torch.")))


def op_matrices(op_name: str) -> tuple[AotMatrix, ...]:
    """The ``AOT`` matrices of ``kernels/<op_name>.py``, after checking that they cover every
    ``@triton.jit`` kernel that module defines (the helpers it imports are not its own)."""
    module = op_module(op_name)
    matrices = tuple(getattr(module, "AOT", ()))
    defined = {
        value.fn.__name__
        for value in vars(module).values()
        if _is_jit_function(value) and value.fn.__module__ == module.__name__
    }
    missing = sorted(defined - {matrix.kernel.fn.__name__ for matrix in matrices})
    if not matrices or missing:
        raise ValueError(
            f"{module.__name__} must declare AOT, one AotMatrix per kernel it defines "
            f"(kernels/aot.py); missing for {missing or sorted(defined)}"
        )
    return matrices


def _is_jit_function(value) -> bool:
    # JITFunction and the interpreter's InterpretedFunction both wrap the Python function as .fn.
    return callable(getattr(value, "fn", None)) and hasattr(value, "arg_names")
