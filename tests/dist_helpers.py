"""Running a test body on several gloo ranks (the CPU stand-in for NCCL), one process each.

``run_on_ranks(body, world, *args)`` spawns ``world`` processes, initialises a gloo process
group on a free local port, and calls ``body(rank, world, *args)`` in each; an assertion (or any
exception) in any rank fails the test with that rank's traceback. ``body`` must be a module-level
function (it is pickled into the workers).
"""

from __future__ import annotations

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, body, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        # DDP's and FSDP's reference cycles hold the group's communicators: collect them first
        # (gloo's destructor, left to the interpreter's exit, can abort the process).
        gc.collect()
        dist.destroy_process_group()


def run_on_ranks(body, world: int = 2, *args) -> None:
    mp.spawn(_worker, args=(world, free_port(), body, args), nprocs=world, join=True)


def relative_errors(got, expected) -> list[float]:
    return [((a - b).norm() / b.norm().clamp_min(1e-300)).item() for a, b in zip(got, expected)]
