"""Causal core attention softmax(q k^T * scale) v with one implementation per device.

- CPU / CUDA: torch's scaled_dot_product_attention. It accepts a value head size different from
  the query/key head size (as MLA has: 128 vs 192 in DeepSeek-V3), but then only through its slow
  math path on CPU (flash kernels want one head size), so a narrower v is zero-padded to the q/k
  head size and the output sliced back, as on HPU. MLA avoids even that copy by passing a wider
  window of its kv projection as v (see `mla.py`): extra v columns only add output columns.
- HPU: Intel's FusedSDPA when the stack provides it. The value is zero-padded to the query/key
  head size before the call and the output sliced back, because Gaudi's flash kernel expects one
  head size for q, k and v (zero columns of v only produce zero output columns).
- Eager fallback (kernels.use_fused_sdpa False): explicit matmuls with the softmax in fp32, the
  same arithmetic as HF's eager attention; for debugging and numerics checks.

All tensors are [batch, heads, seq, dim].
"""

from __future__ import annotations

from typing import Any, Optional

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
    fused_sdpa = (device or device_of(q)).fused_sdpa()
    if fused_sdpa is not None:
        return _hpu_fused_attention(fused_sdpa, q, k, v, softmax_scale, kernels)
    v_dim = v.shape[-1]
    pad = q.shape[-1] - v_dim
    if pad > 0:
        # Zero-pad v to the q/k head size: with one head size torch picks its flash kernels (on CPU
        # the math path is the only one taking a different v size; on CUDA flash needs one size too).
        # Zero columns of v only produce zero output columns, sliced off below.
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    return out[..., :v_dim] if pad > 0 else out
