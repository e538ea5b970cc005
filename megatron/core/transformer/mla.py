"""Multi-head Latent Attention (DeepSeek-V2/V3), training form.

Keys and values are compressed into a `kv_lora_rank` latent plus one rope key shared by all heads;
queries optionally pass through a `q_lora_rank` bottleneck. For training the latent is expanded
back to per-head keys/values (no absorbed-weight inference trick), following
Hugging Face's DeepseekV3Attention step by step so HF checkpoints load with the same parameter names:

  q   = q_proj(h)  or  q_b_proj(q_a_layernorm(q_a_proj(h)))          -> per head [nope | rope]
  kv_a_proj_with_mqa(h)                                               -> [latent | k_rope]
  kv_b_proj(kv_a_layernorm(latent))                                   -> per head [k_nope | v]
  key = [k_nope | rope(k_rope) broadcast], query = [q_nope | rope(q_rope)]
  out = o_proj(causal_attention(query, key, v, scale))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.core.config import DeepSeekConfig
from megatron.core.device import Device, device_of
from megatron.core.tensor_parallel import copy_to_region, gather_from_sequence_parallel_region
from megatron.core.transformer.attention import core_attention, mla_value
from megatron.core.transformer.parallel_context import NO_TENSOR_PARALLEL, SEQUENCE_DIM, TensorParallelContext
from megatron.core.transformer.rmsnorm import RMSNorm
from megatron.core.transformer.rope import RotaryEmbedding, apply_rotary, softmax_scale


class MultiLatentAttention(nn.Module):
    """MLA block. forward: hidden [batch, seq, hidden] -> [batch, seq, hidden].

    `rotary` may be shared between layers (it holds no parameters); `device` overrides the device
    layer used for fused kernels (tests inject a fake HPU).

    Tensor parallelism (`tp`) splits the heads: q_proj / q_b_proj and kv_b_proj are column-parallel,
    o_proj row-parallel; the down-projections into the latents and their norms are replicated and
    see the full sequence (under SP the block input [b, s/tp, H] is gathered first), so their
    gradients are identical on every TP rank once the partial gradients flowing back from the
    per-head layers are summed (inside the column layers, and for the shared rope key here).
    """

    def __init__(
        self,
        config: DeepSeekConfig,
        *,
        rotary: Optional[RotaryEmbedding] = None,
        device: Optional[Device] = None,
        tp: TensorParallelContext = NO_TENSOR_PARALLEL,
    ) -> None:
        super().__init__()
        mla = config.mla
        if mla.num_heads % tp.size:
            raise ValueError(
                f"attention heads ({mla.num_heads}) must be divisible by the tensor-parallel size ({tp.size})"
            )
        self.tp = tp
        self.recompute_core_attention = False  # selective recompute (set by the model)
        self.config = config
        self.num_heads = mla.num_heads
        self.q_lora_rank = mla.q_lora_rank
        self.kv_lora_rank = mla.kv_lora_rank
        self.qk_nope_head_dim = mla.qk_nope_head_dim
        self.qk_rope_head_dim = mla.qk_rope_head_dim
        self.qk_head_dim = mla.qk_head_dim
        self.v_head_dim = mla.v_head_dim
        self.softmax_scale = softmax_scale(mla, config.rope)
        self._device = device
        hidden, bias, fused_norm = config.hidden_size, mla.attention_bias, config.kernels.use_fused_rmsnorm

        if self.q_lora_rank is None:
            self.q_proj = self._column_parallel_linear(hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = self._replicated_linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, mla.lora_norm_eps, fused_norm, device)
            self.q_b_proj = self._column_parallel_linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = self._replicated_linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, mla.lora_norm_eps, fused_norm, device)
        self.kv_b_proj = self._column_parallel_linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = self._row_parallel_linear(self.num_heads * self.v_head_dim, hidden, bias=bias)
        self.rotary_emb = rotary if rotary is not None else RotaryEmbedding(self.qk_rope_head_dim, config.rope)

    # ---- linear construction: the one place tensor parallelism swaps in its layers ----------------
    def _replicated_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """Down-projections into the small latents (q_a_proj, kv_a_proj_with_mqa): full copy per TP rank."""
        return NO_TENSOR_PARALLEL.column_linear(in_features, out_features, bias, gather_sequence=False,
                                                use_onednn=self.config.kernels.use_onednn_linear)

    def _column_parallel_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """Head-producing projections (q_proj / q_b_proj, kv_b_proj): output rows split by head under TP."""
        return self.tp.column_linear(in_features, out_features, bias, gather_sequence=False,
                                     use_onednn=self.config.kernels.use_onednn_linear)

    def _row_parallel_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """o_proj: input columns split by head under TP, partial outputs summed (reduce-scattered under SP)."""
        return self.tp.row_linear(in_features, out_features, bias, use_onednn=self.config.kernels.use_onednn_linear)

    def _fused_rope(self, like: torch.Tensor) -> Optional[object]:
        """Intel's fused RoPE where the device has it and `kernels.use_fused_rope` (default on) allows."""
        if not self.config.kernels.use_fused_rope:
            return None
        return (self._device or device_of(like)).fused_rope()

    # ---- forward ---------------------------------------------------------------------------------
    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [b, s, H] -> q [b, heads, s, qk_head_dim]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        return q.unflatten(-1, (-1, self.qk_head_dim)).transpose(1, 2)

    def rotary_tables(
        self, hidden: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for this input (a model computes these once and passes them to every layer)."""
        return self.rotary_emb(hidden.shape[1], device=hidden.device, dtype=hidden.dtype, position_ids=position_ids)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """hidden [b, s, H]; position_ids [b, s] or None (0..s-1); rotary_pos_emb precomputed (cos, sin)."""
        rope_cfg = self.config.rope
        if self.tp.sequence_split:
            # [b, s/tp, H] -> [b, s, H]. Every consumer below yields full (TP-summed) input grads,
            # so backward only keeps this rank's chunk.
            hidden = gather_from_sequence_parallel_region(
                hidden, self.tp.group, SEQUENCE_DIM, tensor_parallel_output_grad=False
            )
        cos, sin = rotary_pos_emb if rotary_pos_emb is not None else self.rotary_tables(hidden, position_ids)

        q = self._query(hidden)  # [b, n, s, nope + rope]
        q_rope = q[..., self.qk_nope_head_dim :]

        compressed = self.kv_a_proj_with_mqa(hidden)  # [b, s, kv_lora + rope]
        latent, k_rope = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1)  # [b, 1, s, rope]: one rope key shared by all heads
        if self.tp.enabled:
            # Each TP rank uses the shared rope key for its own heads only: sum its gradient.
            k_rope = copy_to_region(k_rope, self.tp.group)

        # The query is q itself with its rope slice rotated in place (no [b, n, s, qk] concatenation).
        # Safe for autograd: the rotation's backward keeps only the cos/sin tables, never q_rope.
        query = q
        fused_rope = self._fused_rope(hidden)
        query[..., self.qk_nope_head_dim :] = apply_rotary(q_rope, cos, sin, rope_cfg, fused_rope)  # [b, n, s, qk]
        k_rope = apply_rotary(k_rope, cos, sin, rope_cfg, fused_rope)  # [b, 1, s, rope]

        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [b, s, n * (nope + v)]
        kv = kv.unflatten(-1, (-1, self.qk_nope_head_dim + self.v_head_dim)).transpose(1, 2)  # [b, n, s, nope + v]
        k_nope = kv[..., : self.qk_nope_head_dim]  # [b, n, s, nope]
        key = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)  # [b, n, s, qk]

        # Value: the narrow v or a q/k-wide view of kv, whichever the attention kernel runs cheapest
        # (see attention.mla_value); `lead` extra leading output columns are dropped below.
        value, lead = mla_value(kv, self.qk_nope_head_dim, self.qk_head_dim, self.config.kernels, self._device)

        if self.recompute_core_attention and torch.is_grad_enabled():
            # Selective recompute: keep q, k, v, recompute softmax(QK^T)V in backward.
            out = checkpoint(
                core_attention, query, key, value, self.softmax_scale, self.config.kernels, self._device,
                use_reentrant=False,
            )
        else:
            out = core_attention(query, key, value, self.softmax_scale, self.config.kernels, self._device)
        if lead:
            out = out[..., lead:]  # [b, n, s, v]
        out = out.transpose(1, 2).flatten(2)  # [b, s, n * v]
        return self.o_proj(out)
