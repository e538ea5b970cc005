"""How a model is split over ranks: the one object the model and its modules receive.

`ParallelContext` bundles what the modules need to know about the layout, derived once from the
rank grid (`ParallelContext.from_parallel_state`), and nothing else:
- `tp` (`TensorParallelContext`): the group that splits attention heads, dense MLPs and the
  vocabulary; under sequence parallelism activations are [b, s/tp, h] between blocks (every TP
  rank holds a distinct slice of the sequence; the column-parallel layer entering a block gathers
  it along dim 1, the row-parallel layer leaving it reduce-scatters back);
- `ep` (`ExpertParallelContext`): the group that splits the routed experts of every MoE layer and
  the token dispatcher ("alltoall" or "allgather") that moves tokens over it;
- `router_load_groups`: the groups whose ranks route DISTINCT tokens through the same (replicated)
  routers, i.e. the TP x DP ranks of a pipeline stage; the aux-loss-free expert-bias update sums
  the routing loads over them.

Parameter attributes read by gradient finalisation (megatron/core/distributed):
- `tensor_model_parallel` (set by the TP layers): a shard, distinct per TP rank;
- `sequence_parallel`: replicated over TP but fed this rank's tokens only under SP, so its
  gradient is a partial sum that must be all-reduced over the TP group (norms between blocks,
  the MoE router, replicated shared experts, MTP projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

import torch.distributed as dist
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, Linear, RowParallelLinear

if TYPE_CHECKING:
    from megatron.core.parallel_state import ParallelState

SEQUENCE_DIM = 1  # batch-first activations
TOKEN_DISPATCHER_TYPES = ("alltoall", "allgather")


@dataclass(frozen=True)
class TensorParallelContext:
    """The TP group a module is split over (size 1 = no tensor parallelism).

    `sequence_parallel` only takes effect with size > 1 (with one rank there is nothing to split).
    """

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    sequence_parallel: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def sequence_split(self) -> bool:
        """Activations between blocks are [b, s/tp, h]."""
        return self.enabled and self.sequence_parallel

    def column_linear(
        self, in_features: int, out_features: int, bias: bool, gather_sequence: bool, *, use_onednn: bool
    ) -> nn.Module:
        """Output features split over TP. `gather_sequence`: the input is a sequence-parallel
        activation [b, s/tp, in] to be all-gathered first (only where a block begins).
        `use_onednn`: fp32 CPU GEMMs through oneDNN (`KernelConfig.use_onednn_linear`).
        Weights are left for `megatron.core.models.deepseek.init.initialize_parameters`."""
        if not self.enabled:
            return Linear(in_features, out_features, bias=bias, use_onednn=use_onednn)
        return ColumnParallelLinear(
            in_features,
            out_features,
            group=self.group,
            bias=bias,
            sequence_parallel=self.sequence_split and gather_sequence,
            sequence_dim=SEQUENCE_DIM,
            init_method=None,
            use_onednn=use_onednn,
        )

    def row_linear(self, in_features: int, out_features: int, bias: bool, *, use_onednn: bool) -> nn.Module:
        """Input features split over TP; partial outputs summed (reduce-scattered under SP)."""
        if not self.enabled:
            return Linear(in_features, out_features, bias=bias, use_onednn=use_onednn)
        return RowParallelLinear(
            in_features,
            out_features,
            group=self.group,
            bias=bias,
            input_is_parallel=True,
            sequence_parallel=self.sequence_split,
            sequence_dim=SEQUENCE_DIM,
            init_method=None,
            use_onednn=use_onednn,
        )

    def mark_sequence_parallel(self, params: Iterable[nn.Parameter]) -> None:
        """Tag replicated parameters that see only this rank's tokens under SP."""
        if self.sequence_split:
            for p in params:
                p.sequence_parallel = True  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ExpertParallelContext:
    """The EP group over which the routed experts are split, this rank's place in it, and the
    token dispatcher that exchanges tokens over it (ignored when the group has one rank).
    `overlap_shared_experts`: compute the shared experts while the dispatch exchange is in flight
    (--moe-shared-expert-overlap); otherwise after the routed experts' combine."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    dispatcher: str = "alltoall"
    overlap_shared_experts: bool = False

    def __post_init__(self) -> None:
        if self.dispatcher not in TOKEN_DISPATCHER_TYPES:
            raise ValueError(f"--moe-token-dispatcher-type must be one of {TOKEN_DISPATCHER_TYPES}, got {self.dispatcher!r}")
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"expert-parallel rank {self.rank} of size {self.size}")


@dataclass(frozen=True)
class ParallelContext:
    """Everything a DeepSeek model stage needs to know about the layout (see module docstring)."""

    tp: TensorParallelContext = TensorParallelContext()
    ep: ExpertParallelContext = ExpertParallelContext()
    router_load_groups: Tuple[Optional[dist.ProcessGroup], ...] = ()

    @classmethod
    def from_parallel_state(cls, state: "ParallelState", dispatcher: str = "alltoall",
                            overlap_shared_experts: bool = False) -> "ParallelContext":
        """The context of this rank in `state`'s layout. Expert tensor parallelism is not supported:
        experts are whole on each expert-parallel rank."""
        if state.size("etp") > 1:
            raise ValueError(
                f"--expert-tensor-parallel-size {state.size('etp')} is not supported: experts are whole on each "
                "expert-parallel rank; use --expert-tensor-parallel-size 1"
            )
        tp = TensorParallelContext(group=state.group("tp"), size=state.size("tp"), sequence_parallel=state.sequence_parallel)
        ep = ExpertParallelContext(group=state.group("ep"), size=state.size("ep"), rank=state.rank_in("ep"),
                                   dispatcher=dispatcher, overlap_shared_experts=overlap_shared_experts)
        load_groups = tuple(state.group(kind) for kind in ("tp", "dp") if state.size(kind) > 1)
        return cls(tp=tp, ep=ep, router_load_groups=load_groups)


SINGLE_DEVICE = ParallelContext()
NO_TENSOR_PARALLEL = TensorParallelContext()
