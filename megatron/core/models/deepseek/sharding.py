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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

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
