r"""LFR on models wrapped for data parallelism: ``DistributedDataParallel`` (DDP).

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

Sharded data parallelism (FSDP2's ``fully_shard``) is refused. Its hooks all-gather and
reduce-scatter around each module's *first-order* backward, and the penalty's gradient of a
gradient arrives outside them. Measured on 2 gloo ranks (torch 2.13, double backprop, fp64): by
default the double backward fails (pytorch/pytorch#172543); with ``set_reshard_after_backward(False)``
a model sharded layer by layer gets no gradient at all; only a model sharded as one unit
(``fully_shard(model)`` alone), with ``set_reshard_after_backward(False)`` and ``model.reshard()``
after every backward, was exact. That last step belongs to the caller's loop (a forward before it
would use stale parameters), and the linearized engine cannot see through FSDP's hooks, so
lfr_ext does not take FSDP2 models until it can own that protocol.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (``model`` itself when it is not wrapped), also through a
    ``torch.compile`` of the wrapper (whose module then runs uncompiled)."""
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, DistributedDataParallel):
        return inner.module
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_data_parallel(model: nn.Module, penalty_mode: str | None) -> None:
    """Refuse the wrappers and layers with which an LFR step would be wrong, naming why.

    ``penalty_mode`` is that of the penalty pass (None for the ascent alone, as in
    :func:`lfr_ext.local_flatness`, which runs in eval mode)."""
    if isinstance(model, (nn.DataParallel, *_fsdp1_classes())):
        raise NotImplementedError(
            f"lfr_ext does not take {type(model).__name__} models: use DistributedDataParallel (one process per "
            "GPU, torchrun). nn.DataParallel replicates the model in every forward, and FSDP's hooks reduce-scatter "
            "around each module's first-order backward, which the penalty's gradient of a gradient misses"
        )
    if isinstance(model, DistributedDataParallel) and model.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) plans its gradient reduction from the first iteration's "
            "autograd graph; with LFR's extra passes it never synchronises the gradients. Construct DDP without "
            "static_graph (find_unused_parameters is fine)"
        )
    net = unwrapped(model)
    if _is_fully_sharded(net):
        raise NotImplementedError(
            "lfr_ext does not support FSDP2 (fully_shard): its hooks reduce-scatter around each module's first-order "
            "backward, and the penalty's gradient of a gradient arrives outside them (the double backward fails, "
            "pytorch/pytorch#172543, or loses the gradients). Use DistributedDataParallel"
        )
    if penalty_mode == "caller" and _distributed_world_size() > 1:
        synced = [name or type(net).__name__ for name, m in net.named_modules()
                  if isinstance(m, nn.SyncBatchNorm) and m.training]
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


def _is_fully_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _distributed_world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


__all__ = ["check_data_parallel", "unwrapped"]
