"""Run a function on W gloo ranks over loopback (torch.multiprocessing spawn) for tests.

Every collective runs under the process-group timeout below, so a mismatch that a check
misses fails the test instead of hanging it. An exception on any rank fails the spawn.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, local_world_size: int, fn: Callable, args: tuple, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    # What torchrun would set: 2dh reads the node size from it.
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args, local_world_size: int | None = None, timeout_s: float | None = None
) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes (fn: module-level);
    ``timeout_s``: the collectives' timeout (default :data:`TIMEOUT`)."""
    local = local_world_size or world_size
    timeout_s = TIMEOUT.total_seconds() if timeout_s is None else timeout_s
    mp.spawn(_worker, args=(world_size, free_port(), local, fn, args, timeout_s), nprocs=world_size, join=True)
