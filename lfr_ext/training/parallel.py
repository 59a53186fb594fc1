"""``lfr-train`` under ``torchrun``: one process per device, DistributedDataParallel, rank 0 writes.

    torchrun --nproc_per_node=N -m lfr_ext.train --method lfr ...      # gloo on CPU, NCCL on CUDA

What changes with N > 1 ranks (and nothing does with one):

* **Data.** Every rank walks the same (seed, epoch) order of global batches of ``batch_size``
  images, augments the global batch (so the augmentation is the single-process one), and trains
  on its ``1/N`` slice. ``batch_size`` must be a multiple of N; a last batch that is not is
  skipped.
* **Randomness.** Model initialisation uses ``seed`` on every rank (DDP starts from rank 0's
  weights anyway); then each rank's global RNG is seeded by (seed, rank), so the ranks draw
  different start noise, PGD starts and Dropout masks. Checkpoints hold every rank's RNG states.
* **Model.** ``DistributedDataParallel`` without buffer syncing at each forward
  (``forward_sync_buffers=False`` from torch 2.13, ``broadcast_buffers=False`` before; the former
  still syncs the identical initial buffers once): BatchNorm keeps per-rank statistics (LFR's
  penalty pass needs per-rank BatchNorm, see :mod:`lfr_ext.wrapped`), and the running statistics
  are averaged across ranks at the end of every epoch, so evaluation and checkpoints see one
  consistent model.
* **Outputs.** Rank 0 writes the checkpoints, metrics, summary and log lines; the training
  loss, penalty and accuracy are summed over the ranks; the validation monitor runs the same
  attack on every rank (the models are identical), so its figures need no reduction.
* **Restarts.** A run that ``torchrun`` restarts after a rank died (``--max-restarts``) resumes
  by itself from the last checkpoint *this job* wrote (a folder holding another run still needs
  ``--resume``); a checkpoint is resumed only at the world size it was written with.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarted_by_torchrun() -> bool:
    """True in a group that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def job_id() -> str | None:
    """torchrun's id of this job (the same across its restarts), or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if launched_by_torchrun() else None


@contextlib.contextmanager
def process_group(device: torch.device):
    """Yield the :class:`Ranks` of this process; under torchrun, with the process group set up
    (NCCL for CUDA, gloo for the CPU) and torn down afterwards, unless the caller already did."""
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        yield Ranks()
        return
    created = not dist.is_initialized()
    if created:
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if created:
            # DDP's reducer (kept by reference cycles, e.g. a captured step's bound methods) must
            # be freed before the process group: freed after destroy_process_group() it can
            # deadlock gloo's worker threads on the GIL.
            gc.collect()
            dist.destroy_process_group()


def _init_process_group(backend: str) -> None:
    """``init_process_group`` from torchrun's environment. When torchrun's agent hosts the
    store, its keys outlive a failed attempt, and on the restart gloo reads the dead attempt's
    peer addresses and hangs connecting to them (seen with torch 2.13): a key prefix per
    attempt keeps the attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        dist.init_process_group(backend)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timedelta(minutes=10)
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"lfr_ext/attempt{attempt}", store), rank=rank, world_size=world
    )


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and ranks.parallel:
        if device.index is not None:
            raise ValueError(
                f"--device {device} under torchrun would put every rank on one GPU; pass --device cuda "
                "(each rank takes cuda:LOCAL_RANK)"
            )
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNG after model initialisation (world size > 1)."""
    return (seed * 1_000_003 + 0x5A4E * (rank + 1)) % (2**63 - 1)


def wrap(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """``model`` itself on one rank; else DDP with per-rank BatchNorm statistics. On a GPU it is
    built on a side stream, as CUDA-graph capture of DDP requires (PyTorch's CUDA-graphs notes)."""
    return data_parallel(model, device) if ranks.parallel else model


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP with per-rank BatchNorm statistics; on a GPU built on a side stream (for capture)."""
    per_rank_buffers = _per_rank_buffers()
    if device.type != "cuda":
        return DistributedDataParallel(model, **per_rank_buffers)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ddp = DistributedDataParallel(model, device_ids=[device.index], **per_rank_buffers)
    torch.cuda.current_stream().wait_stream(side)
    # DDP samples runtime statistics with CUDA timing events on every 100th iteration; inside a
    # captured step (re-captured after every schedule change) they would land in the graph.
    if hasattr(ddp, "_set_ddp_runtime_logging_sample_rate"):
        ddp._set_ddp_runtime_logging_sample_rate(2**31 - 1)
    return ddp


def _per_rank_buffers() -> dict:
    """DDP's switch for not syncing buffers at every forward: ``forward_sync_buffers=False``
    from torch 2.13 (``broadcast_buffers`` is deprecated there), ``broadcast_buffers=False`` before."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor | None:
    """This rank's slice of a global batch of indices; None (skip it, on every rank alike) when
    the batch does not split into equal shares: DDP averages per-rank means, which is the global
    mean only for equal shares, and ranks whose shares had different shapes could mix a graph
    replay (with its captured all-reduce) and an eager step."""
    if not ranks.parallel:
        return batch
    if len(batch) % ranks.world:
        return None
    return batch.tensor_split(ranks.world)[ranks.rank]


def sum_over_ranks(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.parallel:
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def average_running_statistics(model: nn.Module, ranks: Ranks) -> None:
    """BatchNorm running means and variances (every floating buffer) averaged across ranks."""
    if not ranks.parallel:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(ranks.world)


def gather_objects(obj, ranks: Ranks) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ranks.parallel:
        return [obj]
    gathered = [None] * ranks.world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()
