"""Routed experts with stacked weights: grouped GEMM, a sync-free tiled fallback, a padded bmm
path, and Intel Gaudi's fused MoE kernel.

Weights are stacked over the LOCAL experts (dim 0), so expert parallelism shards dim 0:
`gate_up_proj` [E, 2I, H] (rows [:I] = gate, [I:] = up; HF transformers v5's in-memory layout)
and `down_proj` [E, H, I]. Each expert computes down(silu(gate(x)) * up(x)).

Both weights carry `is_expert = True`: under expert parallelism each EP rank holds different
experts, so their gradients are reduced over the expert-data-parallel group ("edp"), not "dp",
and checkpoint code shards / gathers them along dim 0 over "ep" (`shard_expert_weights`).

Paths for rows grouped by expert (`forward`), none of which reads a value back to the host:
- grouped GEMM: torch's `grouped_mm` behind the custom op `megatron::grouped_mm` (an opaque
  node with a shape function, so torch.compile traces the dropless MoE without a graph break
  even where torch's own meta function refuses the dtype, e.g. fp32 on CPU). Used where torch
  has a kernel for the device and dtype (CPU fp32/bf16; CUDA bf16 on SM80+).
- tiled fallback (`_TiledExperts`): every other case on an accelerator (CUDA fp32, HPU dynamic
  shapes, widths that break the kernel's 16-byte alignment) and under torch.compile. Rows of each expert are cut into tiles of
  B = ceil(N / E) rows; a static number of ceil(N / B) + E tiles, each computed with its own
  expert's weights, covers every row. Tile tables are built on the device, so nothing waits on
  the host, and at most N + E * B rows (<= 2N) are multiplied.
- CPU eager without the kernel: one GEMM pair per expert (reading CPU sizes waits on nothing).
Fixed capacity (`forward_padded`, [E, C, H]) is one bmm per projection (HPU graphs).
Gaudi's fused kernel (`forward_routed`) takes tokens with their routing instead of grouped rows.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.device import Device, device_of

# torch's grouped-GEMM kernels need 16-byte aligned strides and base pointers.
_GROUPED_MM_ALIGNMENT = 16


def _grouped_mm_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.nn.functional.grouped_mm exists for this device/dtype.

    CPU runs fp32 and bf16 (torch >= 2.9; the dtypes tested here); CUDA kernels take bf16 only
    (SM80+). HPU has no kernel: the tiled fallback, the padded bmm path or the fused MoE kernel is used.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type in ("cuda", "meta"):
        return dtype == torch.bfloat16
    return False


def _aligned_strides(t: torch.Tensor) -> bool:
    size = t.element_size()
    return not any((s * size) % _GROUPED_MM_ALIGNMENT for s, d in zip(t.stride(), t.shape) if s != 1 and d > 1)


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when its base pointer and strides suit the kernel, else an aligned dense copy."""
    if t.device.type != "meta" and (t.data_ptr() % _GROUPED_MM_ALIGNMENT or not _aligned_strides(t)):
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def _grouped_mm_shape(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> Tuple[int, ...]:
    # a [N, K] x b [E, K, M] -> [N, M];  a [K, N] x b [N, M] (groups along N) -> [E, K, M]
    if b.dim() == 3:
        return (a.shape[0], b.shape[-1])
    return (offs.shape[0], a.shape[0], b.shape[-1])


@torch.library.custom_op("megatron::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped_mm (offs: int32 group ends) as one opaque op with its own backward.

    Rows (or, for the 2-D x 2-D form, reduction columns) past offs[-1] are not computed: their
    output is undefined and callers mask them. (Not routed through oneDNN on CPU, unlike the
    linear layers: oneDNN builds and caches a kernel per GEMM shape, and the experts' row counts
    change every step; see megatron.core.onednn.)
    """
    return F.grouped_mm(_kernel_ready(a), _kernel_ready(b), offs=offs)


@grouped_mm.register_fake
def _grouped_mm_fake(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(_grouped_mm_shape(a, b, offs))


def _grouped_mm_setup(ctx: Any, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    # Only the forward form a [N, K] x b [E, K, M] is differentiated.
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the zero-stride gradient of out.sum()
    grad_a = grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None  # [N, K]
    grad_b = None
    if ctx.needs_input_grad[1]:
        # b is the transposed view of a stacked weight [E, M, K]: compute the gradient in the
        # weight's own layout, [E, M, K] = grad^T a per group, and hand back its transposed view,
        # so the weight's gradient arrives contiguous (no [E, M, K] copy when it is accumulated).
        grad_b = grouped_mm(grad.t(), a, offs).transpose(-2, -1)  # [E, K, M]
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


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


def expert_tiles(tokens_per_expert: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static tiling of rows grouped by expert, computed on the device.

    tokens_per_expert [E] (rows of expert e follow those of e - 1, from row 0), num_rows N ->
    (tile_expert [n], rows [n, B], valid [n, B]) with B = ceil(N / E) and n = ceil(N / B) + E:
    tile t holds rows `rows[t]` of expert `tile_expert[t]`, valid where `valid[t]` (unused slots
    point at row 0). Every counted row appears in exactly one valid slot.
    """
    num_experts = tokens_per_expert.shape[0]
    device = tokens_per_expert.device
    block = max(1, math.ceil(num_rows / num_experts))
    num_tiles = math.ceil(num_rows / block) + num_experts
    counts = tokens_per_expert.to(torch.int64)
    tiles_per_expert = torch.div(counts + block - 1, block, rounding_mode="floor")  # [E]
    tile_end = torch.cumsum(tiles_per_expert, 0)  # [E]
    t = torch.arange(num_tiles, device=device)
    expert = torch.searchsorted(tile_end, t, right=True)  # [n], E for unused tiles
    used = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    row_end = torch.cumsum(counts, 0)  # [E]
    first = (row_end - counts)[expert] + (t - (tile_end - tiles_per_expert)[expert]) * block  # [n]
    rows = first.unsqueeze(1) + torch.arange(block, device=device)  # [n, B]
    valid = (rows < row_end[expert].unsqueeze(1)) & used.unsqueeze(1)
    return expert, torch.where(valid, rows, 0), valid


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


class _TiledExperts(torch.autograd.Function):
    """SwiGLU experts over static tiles (see `expert_tiles`): one small GEMM pair per tile with
    that tile's expert weights picked by a device index, no host synchronisation. Weight gradients
    accumulate per tile with index_add_, so backward never materialises a gathered weight copy."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, tokens: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        tile_expert: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
    ) -> torch.Tensor:
        out = tokens.new_zeros(tokens.shape)  # [N, H]
        ffn = down.shape[-1]
        hidden = []
        for t in range(rows.shape[0]):
            e, r, keep = tile_expert[t : t + 1], rows[t], valid[t].unsqueeze(1)
            x = torch.where(keep, tokens.index_select(0, r), 0.0)  # [B, H]
            h = x @ gate_up.index_select(0, e)[0].t()  # [B, 2I]
            hidden.append(h)
            y = (F.silu(h[:, :ffn]) * h[:, ffn:]) @ down.index_select(0, e)[0].t()  # [B, H]
            out.index_add_(0, r, torch.where(keep, y, 0.0))
        ctx.save_for_backward(tokens, gate_up, down, tile_expert, rows, valid, torch.stack(hidden))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        tokens, gate_up, down, tile_expert, rows, valid, hidden = ctx.saved_tensors
        ffn = down.shape[-1]
        grad_x, grad_gate_up, grad_down = torch.zeros_like(tokens), torch.zeros_like(gate_up), torch.zeros_like(down)
        for t in range(rows.shape[0]):
            e, r, keep = tile_expert[t : t + 1], rows[t], valid[t].unsqueeze(1)
            x = torch.where(keep, tokens.index_select(0, r), 0.0)  # [B, H]
            g = torch.where(keep, grad.index_select(0, r), 0.0)  # [B, H]
            gate, up = hidden[t, :, :ffn], hidden[t, :, ffn:]
            act = F.silu(gate)
            grad_down.index_add_(0, e, (g.t() @ (act * up)).unsqueeze(0))  # [1, H, I]
            g_mid = g @ down.index_select(0, e)[0]  # [B, I]
            g_h = torch.cat((g_mid * up * _silu_grad(gate), g_mid * act), dim=-1)  # [B, 2I]
            grad_gate_up.index_add_(0, e, (g_h.t() @ x).unsqueeze(0))  # [1, 2I, H]
            grad_x.index_add_(0, r, torch.where(keep, g_h @ gate_up.index_select(0, e)[0], 0.0))
        return grad_x, grad_gate_up, grad_down, None, None, None


class GroupedExperts(nn.Module):
    """`num_local_experts` SwiGLU experts applied to tokens already grouped by expert.

    forward(tokens [N, H] sorted by expert, tokens_per_expert [E]) -> [N, H]. Rows at index
    >= sum(tokens_per_expert) (dropped assignments kept in place so shapes stay static) are
    ignored: their output and their input gradient are zero. With `all_rows_valid=True` the
    caller promises there are none, which saves two masking passes.
    forward_padded(tokens [E, C, H]) -> [E, C, H]: fixed capacity per expert, batched matmul,
    static shapes (HPU graphs, pad_to_capacity); zero padding rows give zero outputs.
    forward_routed(hidden [T, H], indices [T, k], weights [T, k]) -> [T, H]: the whole routed
    sum in one call (Gaudi's fused MoE kernel; see `fused_moe_supported`).
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
            out = self._grouped_mm_forward(tokens, offsets)
        elif tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            out = self._loop_forward(tokens, tokens_per_expert)
        else:
            out = self._tiled_forward(tokens, tokens_per_expert)
        if row_valid is not None:
            out = torch.where(row_valid, out, 0.0)  # grouped_mm leaves rows past offsets[-1] undefined
        return out

    def _can_use_grouped_mm(self, tokens: torch.Tensor) -> bool:
        """A kernel exists for this device/dtype and the widths keep every operand 16-byte aligned
        (forward and backward operands: [N, H], [N, 2I], [N, I], the weights and their transposes;
        base pointers are aligned inside the op)."""
        if not _grouped_mm_kernel_available(tokens.device, tokens.dtype):
            return False
        size = tokens.element_size()
        return not (self.hidden_size * size) % _GROUPED_MM_ALIGNMENT and not (self.ffn_hidden_size * size) % _GROUPED_MM_ALIGNMENT

    def _grouped_mm_forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # grouped_mm(a [N, K], b [E, K, M], offs) -> [N, M]: b is the transposed weight view.
        gate_up = grouped_mm(tokens, self.gate_up_proj.transpose(-2, -1), offsets)
        gate, up = gate_up.split(self.ffn_hidden_size, dim=-1)
        act = F.silu(gate) * up  # a fresh, contiguous [N, I]
        return grouped_mm(act, self.down_proj.transpose(-2, -1), offsets)

    def _loop_forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """CPU eager fallback: one GEMM pair per expert. Reading the sizes of CPU tensors waits on
        no device queue, and each expert's GEMMs see exactly its rows (the grouped kernel's sums)."""
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

    def _tiled_forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Fallback without a grouped kernel: static tiles, no host synchronisation (module doc)."""
        tile_expert, rows, valid = expert_tiles(tokens_per_expert, tokens.shape[0])
        return _TiledExperts.apply(tokens, self.gate_up_proj, self.down_proj, tile_expert, rows, valid)

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

    # ---- tokens with their routing (fused MoE kernel) -------------------------------------------
    def forward_routed(
        self,
        hidden: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        expert_offset: int = 0,
        device: Optional[Device] = None,
    ) -> torch.Tensor:
        """out[t] = sum_j weights[t, j] * expert(indices[t, j])(hidden[t]) over the assignments whose
        global expert id lies in this module's [expert_offset, expert_offset + E_local); others add
        nothing. hidden [T, H], indices [T, k] int64, weights [T, k] -> [T, H] in hidden's dtype.

        On Gaudi with the fused kernel this is one call to torch.ops.hpu.mixture_of_experts
        (gate/up fused weights [2I, H] and down [H, I] per expert, i.e. `permuted_weights=True`;
        routing weights cast to the activation dtype, as the kernel takes them). Elsewhere the same
        sum is computed by sorting the local assignments, `forward`, and an fp32 weighted sum.
        `device` overrides the device layer (tests inject a fake HPU).
        """
        kernel = (device or device_of(hidden)).fused_moe()
        if kernel is not None:
            return kernel(
                hidden_states=hidden,
                expert_routing_table=indices,
                router_weights=weights.to(hidden.dtype),
                w12=list(self.gate_up_proj.unbind(0)),
                w3=list(self.down_proj.unbind(0)),
                permuted_weights=True,
                activation="silu",
                experts_min=expert_offset,
                experts_max=expert_offset + self.num_local_experts - 1,
            )
        num_tokens, topk = indices.shape
        local = indices - expert_offset
        is_local = (local >= 0) & (local < self.num_local_experts)  # [T, k]
        key = torch.where(is_local, local, self.num_local_experts).reshape(-1)
        order = torch.argsort(key, stable=True)  # local assignments first, grouped by expert
        rows = hidden.index_select(0, torch.div(order, topk, rounding_mode="floor"))  # [T*k, H]
        counts = torch.zeros(self.num_local_experts, dtype=torch.int64, device=hidden.device)
        counts.scatter_add_(0, torch.where(is_local, local, 0).reshape(-1), is_local.reshape(-1).to(torch.int64))
        out_rows = self.forward(rows, counts)  # rows past the local ones come back zero
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        gathered = out_rows.index_select(0, position).view(num_tokens, topk, -1).float()
        weighted = gathered * torch.where(is_local, weights, 0.0).float().unsqueeze(-1)
        return weighted.sum(dim=1).to(hidden.dtype)


def fused_moe_supported(
    *, device: Device, capacity_factor: Optional[float], has_token_mask: bool, dispatcher: str, ep_size: int
) -> bool:
    """Whether an MoE layer may hand routing to `GroupedExperts.forward_routed` and get exactly its
    dispatch + experts + combine semantics from Gaudi's kernel.

    The kernel is dropless (no capacity, no drop policy), so it matches only with capacity_factor
    None; padding tokens must be expressed as zero routing weights by the caller (it has no token
    mask); under expert parallelism it computes the local experts' partial sums of all tokens,
    which is the all-gather dispatcher's contract (all-gather tokens, local experts,
    reduce-scatter), not the all-to-all one's.
    """
    if device.fused_moe() is None or capacity_factor is not None or has_token_mask:
        return False
    return ep_size == 1 or dispatcher == "allgather"
