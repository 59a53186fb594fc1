"""The global RNG states of torch, captured to be put back: one definition for every place that
rewinds them (the engine's redo of a refused pass, GraphedStep's warm-up), keeps them (the
evaluation's attacks, which seed the global RNG, and the compiled engine's trial compile) or saves
them (the trainer's checkpoints).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


class RngState:
    """torch's CPU RNG state ``cpu`` (a uint8 tensor) and CUDA RNG states ``cuda`` (device index
    -> state), to be put back by :meth:`restore`."""

    def __init__(self, cpu: torch.Tensor, cuda: dict[int, torch.Tensor]):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, cuda_devices: Iterable[int | torch.device] = ()) -> "RngState":
        """The states now: the CPU's and those of ``cuda_devices`` (indices or devices)."""
        return cls(
            torch.get_rng_state(), {index: torch.cuda.get_rng_state(index) for index in map(_index, cuda_devices)}
        )

    @classmethod
    def of_device(cls, device: torch.device) -> "RngState":
        """The states a computation on ``device`` draws from, now: the CPU's, and the device's own
        if it is a GPU."""
        return cls.capture([device] if torch.device(device).type == "cuda" else [])

    @classmethod
    def of_every_device(cls) -> "RngState":
        """The CPU's and every visible GPU's, now (no GPU's before CUDA is initialised: then no
        CUDA generator has been drawn from, and reading one would initialise CUDA)."""
        return cls.capture(range(torch.cuda.device_count()) if torch.cuda.is_initialized() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


def _index(device: int | torch.device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


@contextlib.contextmanager
def preserved_rng(state: RngState | None = None) -> Iterator[RngState]:
    """Inside the block draw freely; at its end the states are as they were (``state``, or the
    CPU's and every initialised GPU's at entry)."""
    state = RngState.of_every_device() if state is None else state
    try:
        yield state
    finally:
        state.restore()
