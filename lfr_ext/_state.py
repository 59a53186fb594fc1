"""Guarding the caller's model: modes and running statistics come back exactly as they were.

LFR runs the model several extra times per training step (the ascent in eval mode, the
penalty pass in the caller's mode). None of these passes may leave a trace on the model:
after the call, even one that raised, every module's ``training`` flag and every buffer
(BatchNorm running statistics included) are as before. Parameters, ``requires_grad`` and
``.grad`` are never written here; only the backward of the returned penalty writes grads.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore each module's ``training`` flag and any buffer a forward changed in place.

    Buffers are compared by their in-place version counter, so a buffer nobody wrote is not
    copied (a copy would bump its version and break any graph of the caller's that saved it).
    """
    modes = module_modes(model)
    buffers = BufferSnapshot(model)
    try:
        yield
    finally:
        restore_modes(modes)
        buffers.restore()


class BufferSnapshot:
    """Every buffer of ``model`` now, to be put back by :meth:`restore` where a forward wrote it
    in place (compared by version counter: a buffer nobody wrote is not copied)."""

    def __init__(self, model: nn.Module):
        self._saved = [(buf, buf._version, buf.detach().clone()) for buf in model.buffers()]

    def restore(self, *, compare_values: bool = False) -> None:
        """Put back each buffer whose version counter moved, or, with ``compare_values``, whose
        values differ: BatchNorm's running-statistics update in train mode writes in place
        without moving the counter (one host sync per buffer; for the rare paths that need it)."""
        with torch.no_grad():
            for buf, version, saved in self._saved:
                if buf._version != version or (compare_values and not torch.equal(buf, saved)):
                    buf.copy_(saved)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm normalises with batch statistics but does not update its
    running statistics (nor ``num_batches_tracked``) inside this block.

    ``track_running_stats=False`` in train mode makes ``_BatchNorm.forward`` pass no running
    buffers to ``F.batch_norm``: the normalisation is the same, the update is skipped.
    Other modules with running state are covered by :func:`preserved_state`'s restore.
    """
    toggled = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for module in toggled:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in toggled:
            module.track_running_stats = True


def set_eval(model: nn.Module) -> None:
    """Eval mode for every module (the authors' ascent runs with ``model.eval()``)."""
    for module in model.modules():
        module.training = False


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]
