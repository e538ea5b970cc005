"""Every torch.distributed collective of the project goes through this module.

NCCL (CUDA) and HCCL (Gaudi) accept only tensors on the rank's accelerator; gloo accepts CPU
tensors too, so a CPU tensor handed to a collective works in every CPU test and fails on the first
accelerator run. Two rules keep that from happening:
- data collectives (`all_reduce`, `all_gather_into_tensor`, ...) take tensors the caller computed
  on the model's device, and pass them on unchanged;
- control collectives (a flag every rank must agree on, an integer chosen by rank 0) allocate
  their tensor here, on the `device` the caller names (the rank's compute device), and read the
  result back to the host afterwards.
An automated test checks that no other module calls a torch.distributed collective, and a
recording stand-in backend (`use_backend`) checks the devices of what is handed over.

Groups of one rank (or no process group at all) make every function a no-op returning its input.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]

_backend: Any = dist  # torch.distributed, or a recording stand-in (tests)


def set_backend(backend: Any) -> None:
    """Route every collective of this process to `backend` from now on (measurement tools)."""
    global _backend
    _backend = backend


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[None]:
    """Route every collective of this module to `backend` (an object with torch.distributed's API)."""
    global _backend
    previous, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = previous


def initialized() -> bool:
    return _backend.is_available() and _backend.is_initialized()


def world_size(group: Group = None) -> int:
    return _backend.get_world_size(group) if initialized() else 1


def rank(group: Group = None) -> int:
    return _backend.get_rank(group) if initialized() else 0


def backend_name(group: Group = None) -> str:
    """"nccl", "hccl", "gloo" (or "" without a process group)."""
    return str(_backend.get_backend(group)) if initialized() else ""


def _active(group: Group) -> bool:
    return initialized() and world_size(group) > 1


# ---- data collectives: tensors already on the model's device --------------------------------------
def all_reduce(tensor: torch.Tensor, group: Group = None, op: Any = None, async_op: bool = False) -> Any:
    """In-place sum (or `op`) over the group; returns the work handle when `async_op`."""
    if not _active(group):
        return None
    return _backend.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather(parts: List[torch.Tensor], tensor: torch.Tensor, group: Group = None, async_op: bool = False) -> Any:
    """List all-gather (the portable form gloo supports); returns the work handle when `async_op`."""
    if not _active(group):
        parts[0].copy_(tensor)
        return None
    return _backend.all_gather(parts, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(out: torch.Tensor, tensor: torch.Tensor, group: Group = None, async_op: bool = False) -> Any:
    """Single-buffer all-gather along dim 0 (nccl / hccl)."""
    if not _active(group):
        out.copy_(tensor)
        return None
    fn = getattr(_backend, "all_gather_single", None) or _backend.all_gather_into_tensor
    return fn(out, tensor, group=group, async_op=async_op)


def reduce_scatter_tensor(out: torch.Tensor, tensor: torch.Tensor, group: Group = None, op: Any = None,
                          async_op: bool = False) -> Any:
    """Single-buffer reduce-scatter along dim 0 (nccl / hccl): this rank's summed chunk into `out`."""
    if not _active(group):
        out.copy_(tensor)
        return None
    fn = getattr(_backend, "reduce_scatter_single", None) or _backend.reduce_scatter_tensor
    return fn(out, tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_to_all_single(out: torch.Tensor, tensor: torch.Tensor, output_split_sizes: Optional[List[int]],
                      input_split_sizes: Optional[List[int]], group: Group = None, async_op: bool = False) -> Any:
    if not _active(group):
        out.copy_(tensor)
        return None
    return _backend.all_to_all_single(out, tensor, output_split_sizes=output_split_sizes,
                                      input_split_sizes=input_split_sizes, group=group, async_op=async_op)


def batch_isend_irecv(ops: Sequence[Any]) -> List[Any]:
    """Post point-to-point transfers together (`p2p_op` builds them); returns the work handles."""
    return list(_backend.batch_isend_irecv(list(ops))) if ops else []


def p2p_op(kind: str, tensor: torch.Tensor, peer: int, group: Group = None) -> Any:
    """A send ("send") or receive ("recv") of `tensor` with global rank `peer`, for `batch_isend_irecv`."""
    fn = {"send": _backend.isend, "recv": _backend.irecv}[kind]
    return _backend.P2POp(fn, tensor, peer, group)


def broadcast(tensor: torch.Tensor, src: int, group: Group = None) -> None:
    if _active(group):
        _backend.broadcast(tensor, src=src, group=group)


# ---- control collectives: this module allocates on the named device ------------------------------------
def any_rank(flag: bool, device: torch.device, group: Group = None) -> bool:
    """True on every rank when `flag` is True on any rank of the group (exit decisions must agree)."""
    if not _active(group):
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    _backend.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def broadcast_int(value: int, device: torch.device, src: int = 0, group: Group = None) -> int:
    """Rank `src`'s `value` on every rank (e.g. a random suffix chosen once)."""
    if not _active(group):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    _backend.broadcast(t, src=src, group=group)
    return int(t.item())


def sum_floats(values: Sequence[float], device: torch.device, group: Group = None) -> List[float]:
    """Element-wise sum of small host values over the group (one collective)."""
    if not _active(group):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    _backend.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(v) for v in t.tolist()]


def barrier(device: torch.device, group: Group = None) -> None:
    """Wait for every rank of the group: an all-reduce of one element on `device` (a plain
    `barrier()` on nccl would have to guess the device)."""
    if _active(group):
        _backend.all_reduce(torch.zeros(1, device=device), group=group)


def all_gather_object(obj: Any, group: Group = None) -> List[Any]:
    """Every rank's picklable `obj` (writing side of checkpoints only: never used to read files)."""
    if not _active(group):
        return [obj]
    out: List[Any] = [None] * world_size(group)
    _backend.all_gather_object(out, obj, group=group)
    return out
