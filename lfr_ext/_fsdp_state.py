"""The one reader (and writer) of FSDP2's private state, for :mod:`lfr_ext.wrapped`.

An LFR step on a ``fully_shard`` model keeps every parameter group unsharded from its first pass
to the end of its backward (see :class:`lfr_ext.wrapped.ShardedStep`). FSDP2's public API
(``FSDPModule.unshard``/``reshard``/``set_reshard_after_*``) sets the reshard policy but cannot
read it back, nor say whether a sharded parameter changed or a gradient arrived late; those facts
live in ``torch.distributed.fsdp._fully_shard``'s private classes (``FSDPState``,
``FSDPParamGroup``, ``FSDPParam``). Every such read is a small function here that names the torch
versions it adapts to (checked against torch 2.11 and 2.13), so that a change in torch's internals
has one place to adapt.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# (post_forward_mesh_info, reshard_after_backward) of one FSDPParamGroup.
GroupSettings = tuple[Any, bool]


def _state(module: nn.Module) -> Any:
    """The ``FSDPState`` of an FSDP2 module (``FSDPModule._get_fsdp_state``, torch 2.11 - 2.13)."""
    return module._get_fsdp_state()


def param_groups(module: nn.Module) -> list:
    """The ``FSDPParamGroup`` objects an FSDP2 module manages (none when it holds no parameters).
    torch 2.11 holds at most one, in ``FSDPState._fsdp_param_group``; torch 2.12 on hold a list,
    ``FSDPState._fsdp_param_groups``."""
    state = _state(module)
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def is_initialised(module: nn.Module) -> bool:
    """Whether FSDP's lazy root initialisation (run by the first forward) has reached ``module``:
    ``FSDPState._is_root`` is None until then (torch 2.11 - 2.13)."""
    return _state(module)._is_root is not None


def initialise_root(root: nn.Module) -> None:
    """Run FSDP's lazy root initialisation on the outermost FSDP2 module ``root``, as its first
    forward would (``FSDPState._lazy_init``, torch 2.11 - 2.13); it sets the root's own reshard
    settings (no reshard after forward)."""
    _state(root)._lazy_init()


def reshard_settings(group: Any) -> GroupSettings:
    """A parameter group's reshard policy as FSDP applies it: ``post_forward_mesh_info`` (None: keep
    the parameters unsharded after forward; what ``set_reshard_after_forward`` writes) and
    ``reshard_after_backward`` (``FSDPParamGroup`` attributes, torch 2.11 - 2.13)."""
    return group.post_forward_mesh_info, group.reshard_after_backward


def restore_reshard_settings(group: Any, settings: GroupSettings) -> None:
    """Give ``group`` back the policy :func:`reshard_settings` read."""
    group.post_forward_mesh_info, group.reshard_after_backward = settings


def auto_reshard_settings(modules: list[nn.Module]) -> list[tuple[Any, Any]]:
    """(state, value) of FSDP's automatic reshard-after-forward choice for each module that has one
    (``FSDPState._auto_reshard_after_forward``, torch 2.11 - 2.13; absent in earlier versions), which
    ``set_reshard_after_forward`` turns off; :func:`restore_auto_reshard_settings` gives it back."""
    states = (_state(module) for module in modules)
    return [
        (state, state._auto_reshard_after_forward) for state in states if hasattr(state, "_auto_reshard_after_forward")
    ]


def restore_auto_reshard_settings(saved: list[tuple[Any, Any]]) -> None:
    """Give back what :func:`auto_reshard_settings` read."""
    for state, value in saved:
        state._auto_reshard_after_forward = value


def sharded_param_versions(groups: list) -> list[int]:
    """The version counter of every sharded parameter of ``groups`` (``FSDPParamGroup.fsdp_params``,
    ``FSDPParam.sharded_param``, torch 2.11 - 2.13): an optimizer step on the sharded parameters
    changes them."""
    return [fsdp_param.sharded_param._version for group in groups for fsdp_param in group.fsdp_params]


def holds_unreduced_gradient(group: Any) -> bool:
    """Whether ``group`` reduce-scatters its gradients and one of its unsharded parameters still
    holds a gradient (``FSDPParamGroup.reduce_grads``, ``FSDPParam._unsharded_param`` /
    ``unsharded_param``, torch 2.11 - 2.13). After FSDP's final backward callback, such a gradient
    arrived too late to be reduced."""
    return group.reduce_grads and any(
        getattr(fsdp_param, "_unsharded_param", None) is not None and fsdp_param.unsharded_param.grad is not None
        for fsdp_param in group.fsdp_params
    )


def reset_iter_state(root: nn.Module) -> None:
    """FSDP's recovery after an error inside a forward or backward: ``FSDPModule.reset_iter_state``
    resets its per-iteration state (torch 2.13; torch 2.11 has no such call, and this does nothing)."""
    if hasattr(root, "reset_iter_state"):
        root.reset_iter_state()


def post_backward_functions() -> tuple[type, ...]:
    """FSDP2's ``RegisterPostBackwardFunction`` (in ``_fsdp_param_group``, torch 2.11 - 2.13): the
    identity ``autograd.Function`` around a module's inputs whose backward only runs FSDP's
    post-backward hook. Empty on a torch without FSDP2."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import RegisterPostBackwardFunction
    except ImportError:  # pragma: no cover - torch without FSDP2
        return ()
    return (RegisterPostBackwardFunction,)
