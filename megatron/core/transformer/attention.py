"""Causal core attention softmax(q k^T * scale) v with one implementation per device.

- CPU / CUDA: torch's scaled_dot_product_attention.
- HPU: Intel's FusedSDPA when the stack provides it.
- Eager fallback (kernels.use_fused_sdpa False): explicit matmuls with the softmax in fp32, the
  same arithmetic as HF's eager attention; for debugging and numerics checks.

Value head size. MLA's value heads are narrower than its query/key heads (DeepSeek-V3: 128 vs
192). Which kernel takes that directly differs per device, and `mla_value` picks the cheapest
value tensor for the kernel that will run:
- CPU: the flash kernel wants one head size for q, k and v; the only taker of a narrower v is
  the math path (materialised scores), measured 1.4-2.2x slower than flash with a q/k-wide v
  (benchmarks/RESULTS.md). So MLA passes the last d_qk columns of each head's [k_nope | v] row
  (a view of its kv projection, no copy): attention is column-wise in v, the extra leading
  columns only add output columns, dropped afterwards, and get zero gradient.
- CUDA: cuDNN's kernel takes d_v != d_qk on Hopper and newer (fp16/bf16, e.g. 192/128), so the
  narrow v goes straight in with cuDNN first in priority: softmax·V does only the needed work.
  Elsewhere the wide view and the flash kernel, as on CPU.
- HPU: FusedSDPA is handed the same wide view; a v narrower than the view allows is zero-padded
  (zero columns only produce zero output columns, sliced off).
- Eager fallback: any v width, the narrow v.

All tensors are [batch, heads, seq, dim].
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.config import KernelConfig
from megatron.core.device import Device, device_of


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Causal attention with an fp32 softmax. q, k [b, h, s, d_qk]; v [b, h, s, d_v] -> [b, h, s, d_v]."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * softmax_scale  # [b, h, s_q, s_k]
    s_q, s_k = scores.shape[-2], scores.shape[-1]
    # Query i (aligned to the end of the keys) may see keys j <= i + (s_k - s_q).
    future = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _hpu_fused_attention(
    fused_sdpa: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kernels: KernelConfig
) -> torch.Tensor:
    """Intel FusedSDPA, causal, no mask or dropout.

    Positional arguments as in Intel's kernel (autograd Functions take no keywords):
    apply(q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, recompute_mode), where
    softmax_mode is "fast" (HL_USE_FAST_SOFTMAX) or "None", and recompute_mode recomputes the
    attention inside the kernel's backward instead of storing it (HL_USE_FUSED_SDPA_WITH_RECOMPUTE).
    """
    v_dim = v.shape[-1]
    pad = q.shape[-1] - v_dim
    if pad > 0:
        v = F.pad(v, (0, pad))  # [b, h, s, d_qk]
    softmax_mode = "fast" if kernels.use_fast_softmax else "None"
    out = fused_sdpa.apply(
        q, k, v, None, 0.0, True, softmax_scale, softmax_mode, kernels.use_fused_sdpa_with_recompute
    )
    return out[..., :v_dim] if pad > 0 else out


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    kernels: KernelConfig,
    device: Optional[Device] = None,
) -> torch.Tensor:
    """Causal attention. q, k [batch, heads, seq, d_qk]; v [batch, heads, seq, d_v] -> [batch, heads, seq, d_v].

    `device` defaults to the device layer of q's device; tests inject a fake HPU Device.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"core_attention expects q, k [b, h, s, d_qk] of one shape and v [b, h, s, d_v]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not kernels.use_fused_sdpa:
        return eager_attention(q, k, v, softmax_scale)
    dev = device or device_of(q)
    fused_sdpa = dev.fused_sdpa()
    if fused_sdpa is not None:
        return _hpu_fused_attention(fused_sdpa, q, k, v, softmax_scale, kernels)
    v_dim = v.shape[-1]
    pad = q.shape[-1] - v_dim
    if pad > 0 and dev.sdpa_takes_value_head_dim(q, v):
        # cuDNN first: it takes the narrower v; the flash kernel would refuse it.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    if pad > 0:
        # Zero-pad v to the q/k head size so torch picks its flash kernel; zero columns of v only
        # produce zero output columns, sliced off below.
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    return out[..., :v_dim] if pad > 0 else out


def mla_value(
    kv: torch.Tensor, nope_dim: int, qk_dim: int, kernels: KernelConfig, device: Optional[Device] = None
) -> Tuple[torch.Tensor, int]:
    """The value tensor to hand `core_attention` for MLA, and how many leading output columns to drop.

    kv [b, h, s, nope + d_v] is the per-head kv projection [k_nope | v]. Returns the narrow v
    [b, h, s, d_v] with 0 when the kernel that will run takes it at no extra cost (eager path,
    CUDA cuDNN), else the view of the last qk_dim columns [b, h, s, qk_dim] with
    lead = qk_dim - d_v (module doc); when d_v + nope < qk_dim no such view exists and the narrow
    v is returned (core_attention then pads it).
    """
    v_dim = kv.shape[-1] - nope_dim
    narrow = kv[..., nope_dim:]
    lead = qk_dim - v_dim
    if lead <= 0 or not kernels.use_fused_sdpa:
        return narrow, 0
    dev = device or device_of(kv)
    if dev.fused_sdpa() is None and dev.sdpa_takes_value_head_dim(kv, narrow):
        return narrow, 0
    if lead <= nope_dim:
        return kv[..., nope_dim - lead :], lead
    return narrow, 0
