"""Multi-process test helpers: a free local port and `spawn(world_size, fn, *args)`.

`spawn` starts `world_size` processes, each with a gloo process group over 127.0.0.1 (a TCP
rendezvous, nothing written into os.environ), calls `fn(rank, world_size, *args)` and returns the
per-rank return values in rank order. `fn` must be a module-level function (it is pickled into the
children). A failure in any rank terminates the others and raises in the parent.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any, Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120  # a failing rank must not leave the others waiting forever in a collective


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, timeout_s: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: int = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; their return values by rank."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world_size, free_port(), timeout_s, fn, args, results), nprocs=world_size, join=True)
        return [results.get(rank) for rank in range(world_size)]
