"""Crash-safe checkpoints: atomic writes and every random state a resumed run needs.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then moved
over the old one with ``os.replace`` (atomic on POSIX), so a kill -9 at any moment leaves
either the previous complete checkpoint or the new complete one, never a torn file.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from .._rng import RngState


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (serialised in memory,
    then written by :func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def capture_rng_states() -> dict:
    """The global RNGs a training step may draw from: torch CPU and CUDA, numpy, python.
    (The data order is not among them: it is a function of (seed, epoch), see loop.py.)"""
    torch_states = RngState.capture(range(torch.cuda.device_count()) if torch.cuda.is_available() else [])
    return {
        "torch_cpu": torch_states.cpu,
        "torch_cuda": list(torch_states.cuda.values()),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    if states["torch_cuda"] and (
        not torch.cuda.is_available() or torch.cuda.device_count() < len(states["torch_cuda"])
    ):
        raise RuntimeError(
            "the checkpoint holds CUDA RNG states for more GPUs than are visible; "
            "resume on the same kind of machine for identical numbers"
        )
    RngState(states["torch_cpu"], dict(enumerate(states["torch_cuda"]))).restore()
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by this package (it holds numpy RNG state, hence
    ``weights_only=False``: load only checkpoints you wrote yourself)."""
    return torch.load(path, map_location=map_location, weights_only=False)
