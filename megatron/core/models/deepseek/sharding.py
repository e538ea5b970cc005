"""Between full (single-process) parameters and one rank's shards of a parallel model.

Parameter names are the same in every layout (layers keep their global index), so a full state
dict maps onto any stage. What a rank holds of a full tensor is read from the parameter's
attributes:
- `tensor_model_parallel` + `partition_dim`: a contiguous chunk along that dim, by TP rank;
  except the fused SwiGLU `gate_up_proj` of TP-split MLPs, whose shard is
  [gate chunk ; up chunk] (so `chunk(2)` inside the MLP still splits gate from up);
- `is_expert`: stacked routed-expert weights [E, ...], this EP rank's experts along dim 0;
- anything else: the whole tensor.
`gather_full_state_dict` is the inverse (collectives over the TP and EP groups).

`placement_of` describes the same split without data: where the rank's tensor sits inside the
full tensor, as a box with global offsets (what distributed checkpoints store and intersect).
Vocabulary padding: a parameter may carry `logical_rows = N` (an int), meaning rows >= N of the
GLOBAL tensor (dim 0) are padding whose count depends on the TP size; its placement's
`global_shape` then has N rows, and the rank's rows beyond N are not part of the logical tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.tensor_parallel import all_gather_along_dim


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank sits on the axes that split parameters."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def from_parallel_state(cls, state) -> "ShardInfo":
        return cls(
            tp_rank=state.rank_in("tp"),
            tp_size=state.size("tp"),
            ep_rank=state.rank_in("ep"),
            ep_size=state.size("ep"),
            tp_group=state.group("tp"),
            ep_group=state.group("ep"),
        )


def _is_fused_gate_up(name: str, param: nn.Parameter) -> bool:
    return name.endswith("gate_up_proj.weight") and getattr(param, "tensor_model_parallel", False)


@dataclass(frozen=True)
class Placement:
    """Where one rank's (TP/EP-local) tensor sits in the full logical tensor, in "stored" dims.

    view_shape: the local tensor's shape as stored; equal to its shape except the fused dense
        SwiGLU `gate_up_proj` [2F/tp, H], seen as [2, F/tp, H] (same memory order) so that its TP
        shard [gate chunk; up chunk] is one box of the full [2, F, H].
    offsets: global index of the local view's first element (same rank as view_shape).
    global_shape: the full tensor in stored dims, dim 0 clipped to `logical_rows` when set.
    logical_rows: rows of the global tensor (dim 0) that are data; None when all are.
    """

    view_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    global_shape: Tuple[int, ...]
    logical_rows: Optional[int] = None


def _fused_view(name: str, param: torch.Tensor) -> bool:
    return name.endswith("gate_up_proj.weight") and param.dim() == 2 and not getattr(param, "is_expert", False)


def placement_of(name: str, param: torch.Tensor, info: ShardInfo) -> Placement:
    """The box of the full tensor that this rank's `param` holds (no data, no communication).

    Mirrors `shard_of`: experts split dim 0 over EP; `tensor_model_parallel` parameters split
    `partition_dim` over TP (dim 1 of the [2, F, H] view for the fused dense gate_up)."""
    shape = tuple(int(d) for d in param.shape)
    fused = _fused_view(name, param)
    if fused:
        if shape[0] % 2:
            raise ValueError(f"{name}: fused gate_up with an odd row count {shape[0]}")
        view = (2, shape[0] // 2, shape[1])
    else:
        view = shape
    offsets, full = [0] * len(view), list(view)
    if getattr(param, "is_expert", False) and info.ep_size > 1:
        full[0], offsets[0] = view[0] * info.ep_size, view[0] * info.ep_rank
    if getattr(param, "tensor_model_parallel", False) and info.tp_size > 1:
        if getattr(param, "is_expert", False):
            raise NotImplementedError(f"{name}: tensor-parallel expert weights (expert tensor parallelism) are not supported")
        dim = int(getattr(param, "partition_dim", 0))
        if fused:
            if dim != 0:
                raise ValueError(f"{name}: fused gate_up split along dim {dim}, expected 0")
            dim = 1
        full[dim], offsets[dim] = view[dim] * info.tp_size, view[dim] * info.tp_rank
    rows = getattr(param, "logical_rows", None)
    if rows is not None:
        rows = int(rows)
        if fused or not full or not 0 < rows <= full[0]:
            raise ValueError(f"{name}: logical_rows {rows} does not fit the global tensor {tuple(full)}")
        full[0] = rows
    return Placement(view_shape=view, offsets=tuple(offsets), global_shape=tuple(full), logical_rows=rows)


def shard_of(name: str, param: nn.Parameter, full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's part of the full tensor `full` for parameter `param` (named `name`)."""
    if getattr(param, "is_expert", False) and info.ep_size > 1:
        local = full.shape[0] // info.ep_size
        full = full[info.ep_rank * local : (info.ep_rank + 1) * local]
    if getattr(param, "tensor_model_parallel", False) and info.tp_size > 1:
        dim = getattr(param, "partition_dim", 0)
        if _is_fused_gate_up(name, param):
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(info.tp_size, 0)[info.tp_rank], up.chunk(info.tp_size, 0)[info.tp_rank]], 0)
        return full.chunk(info.tp_size, dim)[info.tp_rank]
    return full


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor], info: ShardInfo = ShardInfo()) -> None:
    """Copy each of `model`'s parameters and buffers from a full state dict (strict on names held)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = [n for n in own if n not in full and n in model.state_dict()]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} tensors this model holds, e.g. {missing[:5]}")
    for name, tensor in own.items():
        if name not in full:
            continue  # non-persistent buffers
        value = shard_of(name, tensor, full[name], info)
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shard shape {tuple(value.shape)} does not match {tuple(tensor.shape)}")
        tensor.copy_(value)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, info: ShardInfo = ShardInfo()) -> Dict[str, torch.Tensor]:
    """Full tensors of every parameter this rank holds (collective over the TP and EP groups:
    every rank of those groups must call it)."""
    out: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        t = param.detach()
        if getattr(param, "tensor_model_parallel", False) and info.tp_size > 1:
            dim = getattr(param, "partition_dim", 0)
            if _is_fused_gate_up(name, param):
                gate, up = t.chunk(2, dim=0)
                t = torch.cat(
                    [all_gather_along_dim(gate.contiguous(), 0, info.tp_group), all_gather_along_dim(up.contiguous(), 0, info.tp_group)],
                    0,
                )
            else:
                t = all_gather_along_dim(t.contiguous(), dim, info.tp_group)
        if getattr(param, "is_expert", False) and info.ep_size > 1:
            t = all_gather_along_dim(t.contiguous(), 0, info.ep_group)
        out[name] = t.clone()
    for name, buf in model.named_buffers():
        if name in model.state_dict():
            out[name] = buf.detach().clone()
    return out
