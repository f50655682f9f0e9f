"""Run a function on W local processes with a torch.distributed group: tests, benchmarks, notebooks.

``torchrun --nproc-per-node W script.py`` is the way to launch a real job; :func:`run_distributed` is the in-process
equivalent for a function (CPU gloo by default), returning what each rank's call returned.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, threads, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)


def run_distributed(fn, world_size: int, args=(), *, backend: str = "gloo", threads: int | None = 1) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one process group; the list of results.

    fn must be importable by name (defined at module level) and return something ``torch.save`` can write. An
    exception in any rank is raised here with that rank's traceback. threads: torch threads per process (1 keeps
    W processes from fighting over a few cores; None leaves torch's default)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="hfa_ring_") as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), backend, threads, out_dir, fn, tuple(args)),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
