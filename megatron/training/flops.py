"""Model FLOPs per token for DeepSeek MLA + MoE (the formula of benchmarks/train_step.py).

Forward FLOPs per token, a multiply-add counting 2, n heads, d_qk = nope + rope, s = sequence:
    attention projections  2 * (H*q_lora + q_lora*n*d_qk [or H*n*d_qk] + H*(kv_lora + rope)
                                + kv_lora*n*(nope + v) + n*v*H)
    attention core (causal) 2 * n * (d_qk + v) * (s + 1) / 2
    dense MLP               2 * 3 * H * ffn
    MoE MLP                 2 * 3 * H * moe_ffn * (topk + n_shared) + 2 * H * E (router)
    output head             2 * H * V
summed over layers, plus per MTP depth 2 * 2H * H (eh_proj) + one layer + head. Training = 3 x forward.
"""

from __future__ import annotations

from typing import Dict, Optional

from megatron.core.config import DeepSeekConfig

# Dense peak FLOP/s per device by (device name fragment, dtype); used for MFU.
_PEAKS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("GAUDI2", "bfloat16"): 432e12, ("GAUDI3", "bfloat16"): 1835e12,
}


def flops_per_token(c: DeepSeekConfig, seq: int) -> Dict[str, float]:
    """Forward FLOPs per token by part; "forward" the sum, "train" = 3 x forward."""
    m, h = c.mla, c.hidden_size
    d_qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q = h * m.q_lora_rank + m.q_lora_rank * m.num_heads * d_qk if m.q_lora_rank else h * m.num_heads * d_qk
    proj = 2 * (q + h * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim) + m.num_heads * m.v_head_dim * h)
    core = 2 * m.num_heads * (d_qk + m.v_head_dim) * (seq + 1) / 2
    moe = 2 * 3 * h * c.moe.ffn_hidden_size * (c.moe.topk + c.moe.num_shared_experts) + 2 * h * c.moe.num_experts
    dense = 2 * 3 * h * c.ffn_hidden_size
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    parts = {
        "attention_proj": proj * c.num_layers, "attention_core": core * c.num_layers,
        "dense_mlp": dense * (c.num_layers - n_moe), "moe_mlp": moe * n_moe, "head": 2 * h * c.vocab_size,
    }
    for d in range(c.mtp.num_layers):
        mlp = moe if c.is_moe_layer(c.num_layers + d) else dense
        parts[f"mtp{d}"] = 2 * 2 * h * h + proj + core + mlp + 2 * h * c.vocab_size
    parts["forward"] = sum(parts.values())
    parts["train"] = 3 * parts["forward"]
    return parts


def peak_flops(device_kind: str, device_name: str, dtype: str) -> Optional[float]:
    """Known dense peak FLOP/s of one device, or None (then MFU is measured against a matmul)."""
    name = device_name.upper()
    for (fragment, dt), peak in _PEAKS.items():
        if fragment in name and dt == dtype:
            return peak
    return None


def measured_matmul_peak(dtype, use_onednn: bool = True, n: int = 1024, reps: int = 3) -> float:
    """Best FLOP/s of an n^3 CPU matmul (the MFU reference on CPU and unknown devices), run by the
    GEMM the model's linear layers use (`dense_linear`: oneDNN for fp32 unless `use_onednn` is off)."""
    import time

    import torch

    from megatron.core.tensor_parallel import dense_linear

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        dense_linear(a, b, None, use_onednn)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
