r"""LFR on models wrapped for data parallelism: ``DistributedDataParallel`` (DDP) and FSDP2.

A DDP step is exact when every rank's gradient after one ``backward()`` is the mean of the
per-rank single-process gradients. LFR adds passes to a step that DDP does not know about:

* **The inner ascent** differentiates only with respect to the input, so it needs no gradient
  synchronisation. It runs on the unwrapped module (``ddp.module``): through the wrapper each of
  the K forwards would prepare DDP's reducer and broadcast the buffers for nothing, and DDP's
  ``_DDPSink`` (with ``find_unused_parameters`` or ``static_graph``) would hide the model from
  the linearized engine.
* **The clean forward** of :func:`lfr_ext.lfr_loss` goes through the wrapper: it is the step's
  ordinary forward, which prepares the reducer for the backward.
* **The penalty pass** runs on the unwrapped module. Its graph reaches the same parameters, so
  autograd adds its contribution to each parameter's gradient before the parameter's gradient
  accumulator fires DDP's hook: one all-reduce of the whole gradient, as for any step.

``static_graph=True`` is refused: DDP then plans the reduction from the first iteration's graph
and, when that iteration is an LFR step, never synchronises the gradients (measured: relative
error 0.87, nothing raised). A train-mode ``SyncBatchNorm`` in the penalty pass is refused too:
it has no double backward (pytorch/pytorch#61222), and its linearized tangent would need the
Jacobian of the *global* batch statistics; keep per-rank BatchNorm (what large adversarial-
training code bases do, averaging the running statistics each epoch) or pass
``penalty_mode="eval"``.

Sharded data parallelism (FSDP2's ``fully_shard``, per layer or as one unit) is exact under one
rule, which lfr_ext applies itself (:class:`ShardedStep`): the parameters stay unsharded from the
step's first pass to the end of the backward that consumes its loss. The penalty's second-order
nodes are built by a first-order backward *inside* the step and read a module's unsharded
parameters after FSDP has run that module's post-backward; a reshard there frees storage that
autograd still needs (pytorch/pytorch#172543). So the step all-gathers every parameter group
once, runs the ascent and the penalty pass without further collectives, and the step's one
backward reduce-scatters the gradients through FSDP's own hooks; when that backward ends, lfr_ext
reshards every group and gives back the model's ``reshard_after_forward`` /
``reshard_after_backward`` settings. Memory during a step is that of the unsharded parameters
(gradients and optimizer state stay sharded). CUDA-graph capture of an FSDP2 step is refused.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import _fsdp_state


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (``model`` itself when it is not wrapped), also through a
    ``torch.compile`` of the wrapper (whose module then runs uncompiled)."""
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, DistributedDataParallel):
        return inner.module
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_buffers_as_forward_would(model: nn.Module) -> None:
    """Give ``ddp.module`` the buffers DDP's own forward would run with, before a pass on it.

    A DDP forward first broadcasts the module's buffers (BatchNorm's running statistics) from
    rank 0, unless the wrapper was built not to (``broadcast_buffers=False``, or
    ``forward_sync_buffers=False`` from torch 2.13). The inner ascent and the training attacks run
    on ``ddp.module`` before the step's forward through the wrapper; without this they would see
    each rank's own running statistics, which DDP's contract has replaced by rank 0's. The
    broadcast is DDP's own (its buffer communication hook, if one is registered), so the check is
    the one its forward makes; it leaves the buffers' version counters unchanged, as DDP does from
    torch 2.13 on, so that a graph of the step built before still backpropagates. A no-op for any
    other model, and inside ``no_sync()`` (where DDP's forward does not sync either).
    """
    ddp = getattr(model, "_orig_mod", model)  # through a torch.compile of the wrapper
    if not isinstance(ddp, DistributedDataParallel):
        return
    # DDP has no public call for this; its forward runs exactly these two private methods (read
    # here only, so that a change in torch's internals has one place to adapt).
    if not ddp._check_sync_bufs_pre_fwd():
        return
    with torch.autograd._unsafe_preserve_version_counter(tuple(ddp.module.buffers())):
        ddp._sync_buffers()


def check_data_parallel(model: nn.Module, penalty_mode: str | None) -> None:
    """Refuse the wrappers and layers with which an LFR step would be wrong, naming why.

    ``penalty_mode`` is that of the penalty pass (None for the ascent alone, as in
    :func:`lfr_ext.local_flatness`, which runs in eval mode)."""
    if isinstance(model, (nn.DataParallel, *_fsdp1_classes())):
        raise NotImplementedError(
            f"lfr_ext does not take {type(model).__name__} models: use DistributedDataParallel or FSDP2's "
            "fully_shard (one process per GPU, torchrun). nn.DataParallel replicates the model in every forward, and "
            "FSDP1's flat-parameter hooks reshard around each module's first-order backward, which the penalty's "
            "gradient of a gradient reads after"
        )
    if isinstance(model, DistributedDataParallel) and model.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) plans its gradient reduction from the first iteration's "
            "autograd graph; with LFR's extra passes it never synchronises the gradients. Construct DDP without "
            "static_graph (find_unused_parameters is fine)"
        )
    net = unwrapped(model)
    if penalty_mode == "caller" and _distributed_world_size() > 1:
        synced = [
            name or type(net).__name__
            for name, m in net.named_modules()
            if isinstance(m, nn.SyncBatchNorm) and m.training
        ]
        if synced:
            raise ValueError(
                f"SyncBatchNorm in train mode ({', '.join(synced[:3])}) in the penalty pass: it has no double backward "
                "(pytorch/pytorch#61222) and its linearized tangent would need the global batch statistics' "
                "Jacobian. Keep per-rank BatchNorm (average the running statistics across ranks each epoch) or pass "
                "penalty_mode='eval'"
            )


def _fsdp1_classes() -> tuple:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return (FullyShardedDataParallel,)


def sharded_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``module``, root first; empty when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _distributed_world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


# ------------------------------------------------------------------------------------------
# FSDP2: one LFR step with the parameters unsharded (see the module docstring)
# ------------------------------------------------------------------------------------------
# FSDP2 has no public getter for a group's reshard settings nor access to its sharded
# parameters: every read of its private state is in lfr_ext/_fsdp_state.py.
def _roots(modules: list[nn.Module]) -> list[nn.Module]:
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


def _initialise_roots(modules: list[nn.Module]) -> None:
    """Run FSDP's root initialisation, which a first forward would run, before a step reads the
    reshard settings: it sets the root's own (no reshard after forward)."""
    if all(_fsdp_state.is_initialised(m) for m in modules):
        return
    for root in _roots(modules):
        _fsdp_state.initialise_root(root)


class ShardedStep:
    """An LFR step on an FSDP2 model, from its first pass to the end of its backward.

    Opening it sets ``reshard_after_forward`` and ``reshard_after_backward`` to False on every
    FSDP2 module of ``net`` and all-gathers every parameter group (FSDP's pre-forward hooks then
    find them unsharded and communicate nothing). :meth:`close_after_backward` ties the closing
    to the backward(s) that consume the step's losses: when the last of them has run (FSDP's final
    callback, which reduce-scatters the last groups, included), every group is resharded and its
    settings are given back. :meth:`close` does it at once.

    A step whose losses are never backpropagated (a penalty only logged) would leave the
    unsharded copies registered, and FSDP's next forward would use them after an optimizer step
    had changed the sharded parameters. So while a step is open, a forward pre-hook on ``net``
    closes it first when a sharded parameter has been written since the all-gather.
    """

    def __init__(self, net: nn.Module, modules: list[nn.Module]):
        _initialise_roots(modules)
        self._modules = modules
        self._groups = [group for module in modules for group in _fsdp_state.param_groups(module)]
        self._settings = [(group, _fsdp_state.reshard_settings(group)) for group in self._groups]
        self._auto = _fsdp_state.auto_reshard_settings(modules)
        self._pending = 0  # losses of this step whose backward has not run yet
        self.closed = False
        self.close_on_exit = False
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
        for module in modules:
            module.unshard()
        self._versions = self._sharded_versions()
        self._hook = net.register_forward_pre_hook(self._close_if_stale, prepend=True)
        _open_steps[id(net)] = self

    def _sharded_versions(self) -> list[int]:
        return _fsdp_state.sharded_param_versions(self._groups)

    def stale(self) -> bool:
        """Whether a sharded parameter was written since the all-gather (an optimizer step after a
        backward that did not reach this step's losses): the unsharded copies are then out of date."""
        return self._sharded_versions() != self._versions

    def _close_if_stale(self, *_) -> None:
        if self.stale():
            self.close()

    def close_after_backward(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` itself; the step closes when every value passed here has been backpropagated.
        A ``value`` that does not require grad (no backward will come) counts as done."""
        if not value.requires_grad:
            if self._pending == 0:
                self.close()
            return value
        self._pending += 1
        return _CloseAfterBackward.apply(self, value)

    def close_at_exit(self) -> None:
        """Close when the :func:`sharded_step` block ends (a step that no backward will follow)."""
        self.close_on_exit = True

    def _backward_reached(self) -> None:
        if self.closed:
            raise RuntimeError(
                "lfr_ext: this FSDP2 step was already closed (its parameters resharded) by an earlier backward or an "
                "optimizer step; backpropagate all of a step's losses in one backward() before stepping"
            )
        self._pending -= 1
        if self._pending == 0:
            queue = torch.autograd.Variable._execution_engine.queue_callback
            # Queued from a callback, the close runs after every callback queued during the backward,
            # FSDP's final one (which reduce-scatters the groups whose inputs needed no gradient) too.
            queue(lambda: queue(self._close_after_reduction))

    def _close_after_reduction(self) -> None:
        late = [group for group in self._groups if _fsdp_state.holds_unreduced_gradient(group)]
        self.close()
        if late:
            raise RuntimeError(
                "lfr_ext: a gradient reached an FSDP2 module's unsharded parameters after FSDP had reduce-scattered "
                "them, so it would be lost; this backward's gradients are incomplete"
            )

    def close(self, after_error: bool = False) -> None:
        """Give back the settings found when the step opened and reshard every group. After an
        error inside a forward or backward, FSDP's own recovery (``reset_iter_state``, where this
        torch has it) resets its per-iteration state first."""
        if self.closed:
            return
        self.closed = True
        self._hook.remove()
        _open_steps.pop(next((k for k, v in _open_steps.items() if v is self), None), None)
        for group, settings in self._settings:
            _fsdp_state.restore_reshard_settings(group, settings)
        _fsdp_state.restore_auto_reshard_settings(self._auto)
        if after_error:
            for root in _roots(self._modules):
                _fsdp_state.reset_iter_state(root)
        for module in self._modules:
            module.reshard()


class _CloseAfterBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: ShardedStep, value: torch.Tensor) -> torch.Tensor:
        ctx.step = step
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.step._backward_reached()
        return None, grad


# Open steps by id(net), held weakly: a step lives through its net's pre-hook and its losses'
# graphs, and holds its net, so the id cannot be reused while it is here. Process-wide and not in
# lfr_ext.hvp.CACHE: it holds no knowledge to forget, only the steps now open, which a second LFR
# call before the backward must join (clearing it would reshard parameters autograd still needs).
_open_steps: "weakref.WeakValueDictionary[int, ShardedStep]" = weakref.WeakValueDictionary()


def open_sharded_step(net: nn.Module) -> ShardedStep | None:
    """The open :class:`ShardedStep` of ``net`` (a second LFR call before the backward joins the
    same step), a new one, or None when ``net`` has no FSDP2 module."""
    modules = sharded_modules(net)
    if not modules:
        return None
    step = _open_steps.get(id(net))
    if step is not None and step.stale():
        step.close()
        step = None
    return step if step is not None else ShardedStep(net, modules)


class _Unsharded:
    """Stands in for a :class:`ShardedStep` on a model without FSDP2 modules."""

    @staticmethod
    def close_after_backward(value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def close_at_exit() -> None:
        pass


@contextlib.contextmanager
def sharded_step(net: nn.Module) -> Iterator["ShardedStep | _Unsharded"]:
    """The LFR step on ``net``: an open :class:`ShardedStep` for an FSDP2 model (see
    :func:`open_sharded_step`), a no-op otherwise. A step this block opened is closed when the
    block raises, or when it ends after :meth:`ShardedStep.close_at_exit`; a step an earlier call
    opened stays open for the backward that call's loss is waiting for."""
    joined = _open_steps.get(id(net))
    step = open_sharded_step(net)
    if step is None:
        yield _Unsharded()
        return
    opened_here = step is not joined
    try:
        yield step
    except BaseException:
        if opened_here:
            step.close(after_error=True)
        raise
    if step.close_on_exit and opened_here:
        step.close()


def identity_autograd_functions() -> tuple[type, ...]:
    """Custom ``autograd.Function`` classes that a wrapper puts around module inputs and whose
    forward and backward are the identity (their backward only runs a hook): FSDP2's
    post-backward registration. The linearized engine treats their outputs as their inputs."""
    return _fsdp_state.post_backward_functions()


__all__ = [
    "ShardedStep",
    "check_data_parallel",
    "open_sharded_step",
    "sharded_modules",
    "sharded_step",
    "sync_buffers_as_forward_would",
    "unwrapped",
]
