"""Loading weights saved by other code into a model, with errors that name what does not fit.

Released checkpoints come as a bare ``state_dict``, as a dict holding it under ``state_dict``
or ``model`` (with epochs, optimizer state, ...), and with the ``module.`` prefix that
``nn.DataParallel`` / ``DistributedDataParallel`` put on every key (``_orig_mod.`` from
``torch.compile`` too). :func:`load_weights` takes all of them and loads strictly: a missing or
unexpected key, or a shape that differs, is an error listing them, and the model is left as it
was.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def extract_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The parameter/buffer dict inside a loaded checkpoint (see the module docstring)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a state_dict or a dict holding one, got {type(checkpoint).__name__}")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = dict(checkpoint)
    else:
        for key in _CONTAINER_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                state = dict(inner)
                break
            if isinstance(inner, nn.Module):
                state = inner.state_dict()
                break
        else:
            raise ValueError(
                f"no state_dict found in the checkpoint: expected tensors, or a dict of tensors under one of "
                f"{list(_CONTAINER_KEYS)}; its keys are {sorted(map(str, checkpoint))[:10]}"
            )
    stripped = True
    while stripped and state:  # torch.compile(DDP(model)) nests them: _orig_mod.module.
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming every missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        hint = (
            " (a model saved inside lfr_ext.PixelClassifier: load into that, or strip 'model.')"
            if all(k.startswith("model.") for k in unexpected)
            else ""
        )
        problems.append(f"unexpected keys {_listed(unexpected)}{hint}")
    if shapes:
        problems.append(f"shape mismatches {_listed(shapes)}")
    if problems:
        raise ValueError(f"the weights do not fit {type(model).__name__}: " + "; ".join(problems))


def load_weights(model: nn.Module, source, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load ``source`` (a path, a loaded checkpoint or a state_dict) into ``model`` strictly and
    return ``model``. Nothing is loaded when anything does not fit."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"weights file {os.fspath(source)!r} not found")
        try:
            source = torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{os.fspath(source)!r} holds more than tensors (numpy or Python objects), which lfr_ext does not "
                "unpickle from a foreign file: re-save its state_dict alone (torch.save(model.state_dict(), path)); "
                "an lfr-train run is evaluated by its folder"
            ) from error
    state = extract_state_dict(source)
    check_fits(model, state)
    model.load_state_dict(state)
    return model


def _listed(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"({len(items)}): {shown}" + (", ..." if len(items) > limit else "")


__all__ = ["check_fits", "extract_state_dict", "load_weights"]
