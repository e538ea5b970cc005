"""Process start-up: distributed init from torchrun / mpirun environments, device, seeds.

This module lives in megatron.training, so it may read os.environ (megatron.core never does).
"""

from __future__ import annotations

import datetime
import gc
import os
import random
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.device import Device, get_device

_DEFAULT_ADDR, _DEFAULT_PORT = "127.0.0.1", "29500"


def launcher_env(env: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK...) or Open MPI (OMPI_COMM_WORLD_*) variables;
    (0, 1, 0) when neither is set."""
    env = os.environ if env is None else env
    for prefix in ("", "OMPI_COMM_WORLD_"):
        keys = ("RANK", "SIZE" if prefix else "WORLD_SIZE", "LOCAL_RANK")
        names = [prefix + k for k in keys]
        if names[0] in env and names[1] in env:
            try:
                rank, world = int(env[names[0]]), int(env[names[1]])
                local = int(env.get(names[2], rank))
            except ValueError as exc:
                raise ValueError(f"bad launcher variables {names}: {exc}") from None
            if world < 1 or not 0 <= rank < world:
                raise ValueError(f"launcher gives rank {rank} of world size {world}")
            return rank, world, local
    return 0, 1, 0


def resolve_device(kind: str, lazy_mode: Optional[bool] = None) -> Device:
    """The device layer for --device; on HPU lazy mode defaults to PT_HPU_LAZY_MODE (1 unless set to 0)."""
    if lazy_mode is None:
        lazy_mode = os.environ.get("PT_HPU_LAZY_MODE", "1") != "0"
    return get_device(kind, lazy_mode=lazy_mode)


def initialize_distributed(device_kind: str = "auto", timeout_minutes: int = 10,
                           lazy_mode: Optional[bool] = None) -> Tuple[int, int, int]:
    """Init torch.distributed from the launcher's environment; returns (rank, world_size, local_rank).

    A single process without launcher variables gets a gloo group of one (so collectives work).
    Under mpirun, MASTER_ADDR/MASTER_PORT default to 127.0.0.1:29500 (single node).
    """
    rank, world, local_rank = launcher_env()
    device = resolve_device(device_kind, lazy_mode)
    device.set_device(local_rank)
    if dist.is_initialized():
        if dist.get_world_size() != world and "RANK" in os.environ:
            raise ValueError(f"process group has {dist.get_world_size()} ranks but the launcher says {world}")
        return dist.get_rank(), dist.get_world_size(), local_rank
    # The rendezvous address is passed explicitly rather than written into os.environ, so child
    # processes of a single-process run (tools, tests) do not inherit a port that is in use.
    addr = os.environ.get("MASTER_ADDR", _DEFAULT_ADDR)
    if "MASTER_PORT" in os.environ:
        port = os.environ["MASTER_PORT"]
    else:
        port = str(_free_port()) if world == 1 else _DEFAULT_PORT
    backend = device.dist_backend if world > 1 else "gloo"
    # torch.distributed.nn.functional binds `group=group.WORLD` as a default argument when it is
    # first imported (torch.compile / torch._dynamo import it). Imported after the group exists,
    # it would hold the world group past destroy_process_group (see destroy_distributed).
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world, local_rank


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}


def set_deterministic_environment() -> None:
    """--deterministic-mode: the variables that make cuBLAS and NCCL reductions reproducible (set
    before the device and the process group initialise; values the user exported are kept)."""
    for key, value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(key, value)


def set_random_seeds(seed: int, pp_rank: int = 0, device: Optional[Device] = None) -> int:
    """Seed python, numpy and torch with seed + 100 * pp_rank (Megatron's rule); returns that seed."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if device is not None:
        device.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    return seed


def destroy_distributed() -> None:
    """Destroy every process group and free the group objects now.

    gloo's worker threads are joined only when its group objects are freed. Left to interpreter
    shutdown, a worker still dropping its last collective's tensors needs the GIL while Python is
    finalising, and the process aborts ("terminate called without an active exception") after a
    successful run. Callers drop their own references to the groups first."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
