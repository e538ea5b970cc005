"""How a transformer module is split over tensor-parallel ranks: the one place that picks between
plain `nn.Linear` (one device) and the tensor-parallel layers.

Activations are batch-first [b, s, h]. Under sequence parallelism (SP) they are [b, s/tp, h]
between blocks: every TP rank holds a distinct slice of the sequence, and the column-parallel
layer entering a block gathers it (along dim 1), the row-parallel layer leaving it
reduce-scatters back.

Parameter attributes read by gradient finalisation (megatron/core/distributed):
- `tensor_model_parallel` (set by the TP layers): a shard, distinct per TP rank;
- `sequence_parallel`: replicated over TP but fed this rank's tokens only under SP, so its
  gradient is a partial sum that must be all-reduced over the TP group (norms between blocks,
  the MoE router, replicated shared experts, MTP projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch.distributed as dist
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, normal_init

SEQUENCE_DIM = 1  # batch-first activations


@dataclass(frozen=True)
class TensorParallelContext:
    """The TP group a module is split over (size 1 = no tensor parallelism)."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    sequence_parallel: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def column_linear(self, in_features: int, out_features: int, bias: bool, std: float, gather_sequence: bool) -> nn.Module:
        """Output features split over TP. `gather_sequence`: the input is a sequence-parallel
        activation [b, s/tp, in] to be all-gathered first (only where a block begins)."""
        if not self.enabled:
            return _plain_linear(in_features, out_features, bias, std)
        return ColumnParallelLinear(
            in_features,
            out_features,
            group=self.group,
            bias=bias,
            sequence_parallel=self.sequence_parallel and gather_sequence,
            sequence_dim=SEQUENCE_DIM,
            init_method=normal_init(std),
        )

    def row_linear(self, in_features: int, out_features: int, bias: bool, std: float) -> nn.Module:
        """Input features split over TP; partial outputs summed (reduce-scattered under SP)."""
        if not self.enabled:
            return _plain_linear(in_features, out_features, bias, std)
        return RowParallelLinear(
            in_features,
            out_features,
            group=self.group,
            bias=bias,
            input_is_parallel=True,
            sequence_parallel=self.sequence_parallel,
            sequence_dim=SEQUENCE_DIM,
            init_method=normal_init(std),
        )

    def mark_sequence_parallel(self, params: Iterable[nn.Parameter]) -> None:
        """Tag replicated parameters that see only this rank's tokens under SP."""
        if self.enabled and self.sequence_parallel:
            for p in params:
                p.sequence_parallel = True  # type: ignore[attr-defined]


NO_TENSOR_PARALLEL = TensorParallelContext()


def _plain_linear(in_features: int, out_features: int, bias: bool, std: float) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear
