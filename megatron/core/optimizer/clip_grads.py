"""The true global gradient norm (each parameter element counted once over TP/PP/EP/DP), clipping.

Which rank counts a gradient tensor (`counts_in_norm`):
- ``shared_embedding`` copies: only on the first pipeline stage (the last stage holds a copy);
- ``tensor_model_parallel`` shards: on every (expert-)tensor-parallel rank (each holds a distinct piece);
- other parameters are replicated over TP (dense) or ETP (experts): only on (e)tp rank 0.

Reductions of the per-rank sums of squares (D: dense, X: expert):
- with the distributed optimizer each DP rank holds a distinct shard of the reduced gradients:
  D is first summed over "dp", X over "edp";
- X is summed over "ep" (distinct experts per EP rank);
- D + X is summed over "mp" (tp x pp: distinct dense pieces). The "mp" ranks of one stage are the
  TP ranks at a fixed dp rank; when ETP == TP they are exactly the ETP ranks of one (ep, edp)
  cell, so X is counted once per ETP rank. When ETP == 1 (< TP) they hold replicated expert
  sums, so only tp rank 0 contributes X.
Every rank ends with the same float, the global L2 norm of the full model's gradient.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch

from megatron.core import communication as comm
from torch import Tensor, nn

from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.mappings import group_size

GradAndParam = Tuple[Tensor, nn.Parameter]


def counts_in_norm(param: nn.Parameter, parallel_state: ParallelState) -> bool:
    """Whether this rank's copy of `param`'s gradient enters the global norm (see module doc)."""
    if getattr(param, "shared_embedding", False) and not parallel_state.is_first_stage:
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    axis = "etp" if getattr(param, "is_expert", False) else "tp"
    return parallel_state.rank_in(axis) == 0


def _all_reduce(tensor: Tensor, parallel_state: ParallelState, kind: str) -> None:
    group = parallel_state.group(kind)
    if group_size(group) > 1:
        comm.all_reduce(tensor, group=group)


def reduce_over_model(
    dense: Tensor, expert: Tensor, parallel_state: ParallelState, sharded_over_dp: bool
) -> Tensor:
    """Sum per-rank partial statistics (0-dim fp32) over every rank holding distinct gradients.

    dense / expert: this rank's partial sums over the tensors it counts. Returns the global total
    (a new 0-dim tensor, identical on every rank). Collective over the whole world.
    """
    dense, expert = dense.clone(), expert.clone()
    if sharded_over_dp:
        _all_reduce(dense, parallel_state, "dp")
        _all_reduce(expert, parallel_state, "edp")
    _all_reduce(expert, parallel_state, "ep")
    if parallel_state.grid.etp != parallel_state.grid.tp and parallel_state.rank_in("tp") != 0:
        expert = torch.zeros_like(expert)
    total = dense + expert
    _all_reduce(total, parallel_state, "mp")
    return total


def _partial(
    items: Sequence[GradAndParam], parallel_state: ParallelState, stat: Callable[[List[Tensor]], Tensor], device: torch.device
) -> Tuple[Tensor, Tensor]:
    dense = [g for g, p in items if counts_in_norm(p, parallel_state) and not getattr(p, "is_expert", False)]
    expert = [g for g, p in items if counts_in_norm(p, parallel_state) and getattr(p, "is_expert", False)]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return (stat(dense) if dense else zero), (stat(expert) if expert else zero)


def _sum_of_squares(grads: List[Tensor]) -> Tensor:
    norms = torch._foreach_norm([g.float() for g in grads], 2)
    return torch.stack(norms).square().sum()


def _count_zeros(grads: List[Tensor]) -> Tensor:
    return torch.stack([(g == 0).sum() for g in grads]).sum().float()


def global_grad_norm(
    items: Sequence[GradAndParam], parallel_state: ParallelState, sharded_over_dp: bool = False,
    device: torch.device = torch.device("cpu"),
) -> float:
    """L2 norm of the whole model's gradient. items: (fp32 grad or grad shard, its parameter).

    `device` is where the partial sums live when this rank holds no gradient at all.
    Non-finite (NaN / Inf) on every rank if any counted gradient anywhere is non-finite.
    """
    if items:
        device = items[0][0].device
    dense, expert = _partial(items, parallel_state, _sum_of_squares, device)
    total = reduce_over_model(dense, expert, parallel_state, sharded_over_dp)
    return math.sqrt(total.item()) if math.isfinite(total.item()) else float(total.item())


def count_zeros(
    items: Sequence[GradAndParam], parallel_state: ParallelState, sharded_over_dp: bool = False,
    device: torch.device = torch.device("cpu"),
) -> int:
    """Number of exactly-zero gradient entries in the whole model (each element counted once)."""
    if items:
        device = items[0][0].device
    dense, expert = _partial(items, parallel_state, _count_zeros, device)
    return int(reduce_over_model(dense, expert, parallel_state, sharded_over_dp).item())


def clip_grads_(grads: Sequence[Tensor], max_norm: float, total_norm: float) -> float:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that is < 1 (torch's rule).

    Returns the coefficient applied (1.0 when no clipping was needed or max_norm is 0).
    """
    if max_norm <= 0 or not grads:
        return 1.0
    coeff = max_norm / (total_norm + 1e-6)
    if coeff < 1.0:
        torch._foreach_mul_(list(grads), coeff)
        return coeff
    return 1.0
