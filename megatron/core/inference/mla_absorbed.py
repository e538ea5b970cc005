"""Multi-head Latent Attention at inference: latent cache, up-projections absorbed.

Reads the weights of a training-form `MultiLatentAttention` module and computes the same function
without ever expanding per-head keys or values. With kv_b_proj split per head into
W_uk [n, nope, kv_lora] and W_uv [n, v, kv_lora], and c_t the normalized latent of token t:

    q_nope . k_nope,t = q_nope . (W_uk c_t) = (q_nope W_uk) . c_t        (absorbed into the query)
    sum_t p_t v_t     = sum_t p_t (W_uv c_t) = W_uv (sum_t p_t c_t)      (absorbed into the output)

so a head's score against token t is [q_nope W_uk | rope(q_rope)] . [c_t | rope(k_rope,t)] and
only [c_t | rope(k_rope,t)] (kv_lora_rank + qk_rope_head_dim numbers) is cached per token.
Softmax in fp32, scale and rotary tables exactly as the training module uses them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.core.inference.kv_cache import LatentCache
from megatron.core.transformer.rope import apply_rotary


def attention_mask(query_slots: torch.Tensor, starts: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Which cache slots each query may read: [b, s] query slots, [b] first real slot -> [b, 1, s, kv_len] bool.

    A query at slot q reads the slots start..q of its own row (causal, padding excluded). A
    padding query (q < start) reads only itself, so its softmax stays finite and no NaN can reach
    the cache of real tokens.
    """
    keys = torch.arange(kv_len, device=query_slots.device)  # [L]
    q = query_slots.unsqueeze(-1)  # [b, s, 1]
    allowed = (keys <= q) & (keys >= starts.view(-1, 1, 1))
    allowed = allowed | (keys == q)
    return allowed.unsqueeze(1)


def absorbed_weights(attn: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """W_uk [n, nope, kv_lora] and W_uv [n, v, kv_lora] as views of kv_b_proj.weight [n * (nope + v), kv_lora]."""
    weight = attn.kv_b_proj.weight
    per_head = weight.view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank)
    w_uk, w_uv = per_head.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)
    return w_uk, w_uv


def absorbed_attention(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    rotary: Tuple[torch.Tensor, torch.Tensor],
    cache: LatentCache,
    slots: torch.Tensor,
    mask: torch.Tensor,
    kv_len: Optional[int] = None,
) -> torch.Tensor:
    """One MLA block on new tokens: hidden [b, s, H] (already input-normed) -> [b, s, H].

    `attn` is a `MultiLatentAttention` (its projections, norms and sizes are read, nothing is
    changed); rotary = (cos, sin) for the new tokens' positions, [b, 1, s, rope/2]; the new
    tokens' latents are written to `cache` at `slots` [b, s] before attending, then every query
    attends over the first `kv_len` cache slots (all when None) as `mask` [b, 1, s, kv_len] allows.
    """
    b, s, _ = hidden.shape
    n, nope, rope_dim, kv_lora = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    rope_cfg = attn.config.rope
    cos, sin = (t.transpose(1, 2) for t in rotary)  # [b, s, 1, rope/2]: tokens before heads below

    if attn.q_lora_rank is None:
        q = attn.q_proj(hidden)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden)))
    q_nope, q_rope = q.view(b, s, n, nope + rope_dim).split([nope, rope_dim], dim=-1)
    q_rope = apply_rotary(q_rope, cos, sin, rope_cfg)  # [b, s, n, rope]

    latent, k_rope = attn.kv_a_proj_with_mqa(hidden).split([kv_lora, rope_dim], dim=-1)
    latent = attn.kv_a_layernorm(latent)  # [b, s, kv_lora]
    k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin, rope_cfg).squeeze(2)  # [b, s, rope]
    cache.write(slots, latent, k_rope)

    # All heads share the cached keys, so the heads are folded into the query rows and each
    # product is one batched matmul over the batch (no copy of the cache per head), and the
    # absorbed weights are applied per head as one batched matmul over the heads.
    w_uk, w_uv = absorbed_weights(attn)
    q_nope = q_nope.permute(2, 0, 1, 3).reshape(n, b * s, nope)  # [n, b*s, nope]
    q_latent = torch.bmm(q_nope, w_uk).view(n, b, s, kv_lora).permute(1, 2, 0, 3)  # [b, s, n, kv_lora]
    query = torch.cat((q_latent, q_rope.to(q_latent.dtype)), dim=-1).reshape(b, s * n, kv_lora + rope_dim)
    keys = cache.view(kv_len)  # [b, L, kv_lora + rope]
    scores = torch.bmm(query, keys.transpose(1, 2)).float() * attn.softmax_scale  # [b, s*n, L]
    scores = scores.view(b, s, n, -1).masked_fill(~mask.view(b, s, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(keys.dtype).view(b, s * n, -1)
    context = torch.bmm(probs, keys[..., :kv_lora])  # [b, s*n, kv_lora]
    context = context.view(b, s, n, kv_lora).permute(2, 0, 1, 3).reshape(n, b * s, kv_lora)
    out = torch.bmm(context, w_uv.transpose(1, 2))  # [n, b*s, v]
    out = out.view(n, b, s, attn.v_head_dim).permute(1, 2, 0, 3)  # [b, s, n, v]
    return attn.o_proj(out.reshape(b, s, n * attn.v_head_dim))
