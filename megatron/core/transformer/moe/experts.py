"""Routed experts with stacked weights: grouped GEMM, a loop fallback, and a padded bmm path.

Weights are stacked over the LOCAL experts (dim 0), so expert parallelism shards dim 0:
`gate_up_proj` [E, 2I, H] (rows [:I] = gate, [I:] = up; HF transformers v5's in-memory layout)
and `down_proj` [E, H, I]. Each expert computes down(silu(gate(x)) * up(x)).

Both weights carry `is_expert = True`: under expert parallelism each EP rank holds different
experts, so their gradients are reduced over the expert-data-parallel group ("edp"), not "dp",
and checkpoint code shards / gathers them along dim 0 over "ep" (`shard_expert_weights`).
"""

from __future__ import annotations

from typing import Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# torch's grouped-GEMM kernels need 16-byte aligned strides and base pointers.
_GROUPED_MM_ALIGNMENT = 16


def _grouped_mm_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.nn.functional.grouped_mm exists for this device/dtype.

    CPU runs fp32 and bf16 (torch >= 2.9; the dtypes tested here); CUDA kernels take bf16 only (SM80+; older GPUs raise,
    and the caller falls back). HPU has no kernel: the loop fallback or the padded bmm path is used.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type in ("cuda", "meta"):
        return dtype == torch.bfloat16
    return False


def _aligned(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        size = t.element_size()
        if t.device.type != "meta" and t.data_ptr() % _GROUPED_MM_ALIGNMENT:
            return False
        if any((s * size) % _GROUPED_MM_ALIGNMENT for s, d in zip(t.stride(), t.shape) if s != 1 and d > 1):
            return False
    return True


def shard_expert_weights(full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """This EP rank's experts of a stacked weight: [E, ...] -> [E / ep_size, ...] (a view).

    EP rank r holds the contiguous experts [r * E_local, (r + 1) * E_local), the layout the
    dispatchers route to.
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"need 0 <= ep_rank < ep_size, got ep_rank={ep_rank}, ep_size={ep_size}")
    if full.shape[0] % ep_size:
        raise ValueError(f"{full.shape[0]} experts cannot be split over {ep_size} expert-parallel ranks")
    local = full.shape[0] // ep_size
    return full[ep_rank * local : (ep_rank + 1) * local]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects gradients with zero strides (e.g. the expanded ones of
    `out.sum().backward()`: "Invalid strides/sizes"); a contiguous gradient costs one copy only
    when the gradient was not already dense.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


class GroupedExperts(nn.Module):
    """`num_local_experts` SwiGLU experts applied to tokens already grouped by expert.

    forward(tokens [N, H] sorted by expert, tokens_per_expert [E]) -> [N, H]. Rows at index
    >= sum(tokens_per_expert) (dropped assignments kept in place so shapes stay static) are
    ignored: their output and their input gradient are zero. With `all_rows_valid=True` the
    caller promises there are none, which saves two masking passes.
    forward_padded(tokens [E, C, H]) -> [E, C, H]: fixed capacity per expert, batched matmul,
    static shapes (HPU graphs, pad_to_capacity); zero padding rows give zero outputs.
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        use_grouped_gemm: bool = True,
    ) -> None:
        super().__init__()
        if num_local_experts <= 0 or hidden_size <= 0 or ffn_hidden_size <= 0:
            raise ValueError(
                f"GroupedExperts needs positive sizes, got experts={num_local_experts}, hidden={hidden_size}, "
                f"ffn={ffn_hidden_size}"
            )
        self.num_local_experts = num_local_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.use_grouped_gemm = use_grouped_gemm
        self.gate_up_proj = nn.Parameter(torch.empty(num_local_experts, 2 * ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, hidden_size, ffn_hidden_size))
        for param in (self.gate_up_proj, self.down_proj):
            param.is_expert = True  # type: ignore[attr-defined]
        # (device type, dtype) pairs whose grouped_mm kernel raised once; per instance, not global.
        self._grouped_mm_failed: Set[Tuple[str, torch.dtype]] = set()

    # ---- dynamic token counts ------------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, all_rows_valid: bool = False
    ) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.hidden_size:
            raise ValueError(f"experts expect tokens [N, {self.hidden_size}], got {tuple(tokens.shape)}")
        if tokens_per_expert.shape != (self.num_local_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape [{self.num_local_experts}], got {tuple(tokens_per_expert.shape)}"
            )
        tokens = tokens.to(self.gate_up_proj.dtype)
        # int32 offsets, computed on the device: no host synchronisation.
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        row_valid: Optional[torch.Tensor] = None
        if not all_rows_valid:
            row_valid = (torch.arange(tokens.shape[0], device=tokens.device) < offsets[-1]).unsqueeze(-1)
            tokens = torch.where(row_valid, tokens, 0.0)  # backward zeroes the tail rows' gradient
        if self.use_grouped_gemm and self._can_use_grouped_mm(tokens):
            try:
                out = self._grouped_mm_forward(tokens, offsets)
            except (RuntimeError, NotImplementedError):
                self._grouped_mm_failed.add((tokens.device.type, tokens.dtype))
                out = self._loop_forward(tokens, tokens_per_expert)
        else:
            out = self._loop_forward(tokens, tokens_per_expert)
        if row_valid is not None:
            out = torch.where(row_valid, out, 0.0)  # grouped_mm leaves rows past offsets[-1] undefined
        return out

    def _can_use_grouped_mm(self, tokens: torch.Tensor) -> bool:
        key = (tokens.device.type, tokens.dtype)
        if key in self._grouped_mm_failed or not _grouped_mm_kernel_available(tokens.device, tokens.dtype):
            return False
        # Forward and backward operands: [N, H], [N, 2I], [N, I] and the weights (and their transposes).
        size = tokens.element_size()
        if (self.hidden_size * size) % _GROUPED_MM_ALIGNMENT or (self.ffn_hidden_size * size) % _GROUPED_MM_ALIGNMENT:
            return False
        return _aligned(tokens, self.gate_up_proj, self.down_proj)

    def _grouped_mm_forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # grouped_mm(a [N, K], b [E, K, M], offs) -> [N, M]: b is the transposed weight view.
        gate_up = F.grouped_mm(tokens, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = gate_up.split(self.ffn_hidden_size, dim=-1)
        act = F.silu(gate) * up  # a fresh, contiguous [N, I]
        out = F.grouped_mm(act, self.down_proj.transpose(-2, -1), offs=offsets)
        return _ContiguousGrad.apply(out) if torch.is_grad_enabled() else out

    def _loop_forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Fallback: one GEMM pair per expert. Reads the split sizes to the host (one sync)."""
        sizes = [int(n) for n in tokens_per_expert.tolist()]
        tail = tokens.shape[0] - sum(sizes)
        if tail < 0:
            raise ValueError(f"tokens_per_expert sums to {sum(sizes)} but only {tokens.shape[0]} rows were given")
        chunks = torch.split(tokens, sizes + [tail], dim=0)
        outs = []
        for expert, chunk in enumerate(chunks[:-1]):
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).split(self.ffn_hidden_size, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
        outs.append(chunks[-1].new_zeros(tail, self.hidden_size))
        return torch.cat(outs, dim=0)

    # ---- fixed capacity ---------------------------------------------------------------------
    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[0] != self.num_local_experts or tokens.shape[2] != self.hidden_size:
            raise ValueError(
                f"padded experts expect [{self.num_local_experts}, capacity, {self.hidden_size}], "
                f"got {tuple(tokens.shape)}"
            )
        tokens = tokens.to(self.gate_up_proj.dtype)
        gate_up = torch.bmm(tokens, self.gate_up_proj.transpose(1, 2))  # [E, C, 2I]
        gate, up = gate_up.split(self.ffn_hidden_size, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, C, H]
