"""RMSNorm as DeepSeek (and HF) define it, with Intel's fused kernel on Gaudi."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core.device import Device, device_of


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype).

    Statistics are taken in fp32 even for bf16 activations; the normalised value is rounded back
    to the input dtype *before* the weight multiply, which is where HF's result differs from a
    norm that multiplies in fp32.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension. Input [..., hidden] -> output [..., hidden].

    `use_fused` picks Intel's FusedRMSNorm when the tensor lives on an HPU whose stack provides it
    (looked up through the device layer; `device` can be injected for tests), else the torch
    formula of `rms_norm`.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        use_fused: bool = True,
        device: Optional[Device] = None,
    ) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm hidden_size must be positive, got {hidden_size}")
        if eps <= 0:
            raise ValueError(f"RMSNorm eps must be positive, got {eps}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_fused = use_fused
        self._device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused:
            fused = (self._device or device_of(x)).fused_rmsnorm()
            if fused is not None:
                return self._fused_forward(fused, x)
        return rms_norm(x, self.weight, self.eps)

    def _fused_forward(self, fused: object, x: torch.Tensor) -> torch.Tensor:
        # Intel's kernel takes 3-D input [batch, seq, hidden]; fold any other rank into that.
        if x.dim() == 3:
            return fused.apply(x, self.weight, self.eps)
        out = fused.apply(x.reshape(1, -1, x.shape[-1]), self.weight, self.eps)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, use_fused={self.use_fused}"
