"""Parameter initialisation: the one place where a model's weights get their starting values.

The values are a pure function of (seed, parameter name[, expert index]), never of the layout or
of the order in which modules were built, so a model started fresh under any TP / SP / PP / EP /
DP layout and with either token dispatcher holds exactly the weights one process would hold:

- RMSNorm weights: 1.  Biases: 0.  Buffers (the router's expert bias, load counters, rotary
  tables) keep what their module built (zeros / computed tables).
- Every other parameter: N(0, std^2), drawn on the CPU in fp32 by a `torch.Generator` seeded with
  a hash of (seed, name) over the parameter's GLOBAL (unsharded) logical shape, then cast to the
  parameter's dtype. `name` is the parameter's name in the module being initialised; for a
  `DeepSeekModel` stage that is its single-process name ("layers.7.self_attn.o_proj.weight"),
  because decoder layers keep their global index in every pipeline layout.
- Stacked routed-expert weights [E, ...] (`is_expert`): expert e is drawn on its own, seeded with
  hash(seed, name, e), so a rank draws only its own experts, whatever the expert-parallel size.
- Tensor-parallel shards (`tensor_model_parallel`): the full matrix of the parameter is drawn
  (one parameter at a time) and the rank keeps its slice (`sharding.shard_of`).
- Vocabulary padding: embedding / output weights marked `logical_rows = V` draw only the V real
  rows; the padding rows (added for TP divisibility, their number depends on TP) are 0, so the
  real rows do not depend on the padding.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from megatron.core.models.deepseek.sharding import ShardInfo, shard_of
from megatron.core.tensor_parallel.mappings import group_rank
from megatron.core.transformer.parallel_context import SINGLE_DEVICE, ParallelContext
from megatron.core.transformer.rmsnorm import RMSNorm


def parameter_seed(seed: int, name: str, index: Optional[int] = None) -> int:
    """63-bit generator seed of parameter `name` (and expert `index`) under run seed `seed`."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def _normal(shape: tuple, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def _global_shape(param: nn.Parameter, tp_size: int) -> list:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[int(getattr(param, "partition_dim", 0))] *= tp_size
    return shape


def _draw_full(name: str, param: nn.Parameter, std: float, seed: int, tp_size: int) -> torch.Tensor:
    """The parameter's full logical tensor (padding rows zero). [global shape] fp32 on the CPU."""
    shape = _global_shape(param, tp_size)
    rows = getattr(param, "logical_rows", None)
    if rows is None or rows >= shape[0]:
        return _normal(tuple(shape), std, parameter_seed(seed, name))
    full = torch.zeros(shape, dtype=torch.float32)
    full[:rows] = _normal((rows, *shape[1:]), std, parameter_seed(seed, name))
    return full


@torch.no_grad()
def initialize_parameters(
    module: nn.Module, seed: int, std: float, parallel: ParallelContext = SINGLE_DEVICE
) -> None:
    """Give every parameter of `module` its value under the rule in the module docstring.

    `parallel` says which shard of each parameter this rank holds. Parameters on the meta device
    are skipped (shape-only models).
    """
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}
    tp_size = parallel.tp.size
    info = ShardInfo(tp_rank=group_rank(parallel.tp.group) if tp_size > 1 else 0, tp_size=tp_size,
                     ep_rank=parallel.ep.rank, ep_size=parallel.ep.size)
    for name, param in module.named_parameters():
        if param.is_meta:
            continue
        if id(param) in norm_weights:
            param.fill_(1.0)
        elif name.endswith(".bias") or name == "bias":
            param.zero_()
        elif getattr(param, "is_expert", False):
            first = info.ep_rank * param.shape[0]  # global index of local expert 0
            for j in range(param.shape[0]):
                param[j].copy_(_normal(tuple(param.shape[1:]), std, parameter_seed(seed, name, first + j)))
        else:
            full = _draw_full(name, param, std, seed, tp_size)
            param.copy_(shard_of(name, param, full, info))
