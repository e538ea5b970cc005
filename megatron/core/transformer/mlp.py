"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP.

    Gate and up projections are one fused weight `gate_up_proj` of shape [2 * ffn, hidden]
    (rows [:ffn] = gate, [ffn:] = up) so the input is read once by a single GEMM;
    `down_proj` is [hidden, ffn]. Input [..., hidden] -> output [..., hidden].
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool = False) -> None:
        super().__init__()
        self.ffn_hidden_size = ffn_hidden_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
