"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.parallel_context import NO_TENSOR_PARALLEL, TensorParallelContext


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP.

    Gate and up projections are one fused weight `gate_up_proj` of shape [2 * ffn, hidden]
    (rows [:ffn] = gate, [ffn:] = up) so the input is read once by a single GEMM;
    `down_proj` is [hidden, ffn]. Input [..., hidden] -> output [..., hidden]. `use_onednn`: fp32 CPU
    GEMMs through oneDNN (`KernelConfig.use_onednn_linear`).

    Under tensor parallelism gate_up_proj is column-parallel and down_proj row-parallel; each
    rank's gate_up shard must then hold [its gate rows ; its up rows] (see
    `megatron.core.models.deepseek.sharding`, which interleaves full weights that way).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        bias: bool = False,
        tp: TensorParallelContext = NO_TENSOR_PARALLEL,
        *,
        use_onednn: bool,
    ) -> None:
        super().__init__()
        self.ffn_hidden_size = ffn_hidden_size
        self.gate_up_proj = tp.column_linear(hidden_size, 2 * ffn_hidden_size, bias, gather_sequence=True,
                                             use_onednn=use_onednn)
        self.down_proj = tp.row_linear(ffn_hidden_size, hidden_size, bias, use_onednn=use_onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
