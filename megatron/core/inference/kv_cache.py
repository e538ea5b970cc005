"""Latent KV cache of Multi-head Latent Attention.

MLA needs, per token and per layer, only what enters the key/value up-projection: the normalized
`kv_lora_rank` latent c_t and the one rotated rope key k_r,t shared by all heads (the per-head
keys and values are recovered by absorbing kv_b_proj into the query and output side). A layer's
cache is therefore one tensor [batch, max_len, kv_lora_rank + qk_rope_head_dim] laid out as
[latent | rotated rope key], preallocated to the maximum length so every step sees the same
shapes (HPU graphs, torch.compile). Rows are written by slot index (scatter), which lets the
sequences of a batch advance by different amounts (speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.config import MLAConfig


def latent_elements_per_token(mla: MLAConfig) -> int:
    """Cached elements per token and layer: kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3)."""
    return mla.kv_lora_rank + mla.qk_rope_head_dim


def full_kv_elements_per_token(mla: MLAConfig) -> int:
    """Elements per token and layer of a conventional K/V cache of the expanded heads:
    num_heads * (qk_head_dim + v_head_dim) (40960 for DeepSeek-V3)."""
    return mla.num_heads * (mla.qk_head_dim + mla.v_head_dim)


@dataclass
class LatentCache:
    """One attention layer's cache: `data` [batch, max_len, kv_lora_rank + qk_rope_head_dim]."""

    data: torch.Tensor
    kv_lora_rank: int

    @classmethod
    def allocate(
        cls, batch: int, max_len: int, mla: MLAConfig, dtype: torch.dtype, device: torch.device
    ) -> "LatentCache":
        # Zeros, not empty: slots that are never written (padding) are still read by the masked
        # attention product, and 0 * garbage could be NaN.
        data = torch.zeros(batch, max_len, latent_elements_per_token(mla), dtype=dtype, device=device)
        return cls(data=data, kv_lora_rank=mla.kv_lora_rank)

    @property
    def max_len(self) -> int:
        return self.data.shape[1]

    def write(self, slots: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Store latent [b, s, kv_lora] and rotated rope key [b, s, rope] at slots [b, s] (int64)."""
        entry = torch.cat((latent, rope_key), dim=-1).to(self.data.dtype)  # [b, s, kv_lora + rope]
        index = slots.unsqueeze(-1).expand(-1, -1, entry.shape[-1])
        self.data.scatter_(1, index, entry)

    def view(self, kv_len: int | None = None) -> torch.Tensor:
        """The cache, optionally limited to its first `kv_len` slots: [b, L, kv_lora + rope]."""
        return self.data if kv_len is None else self.data[:, :kv_len]

    def nbytes_per_token(self) -> int:
        return self.data.shape[-1] * self.data.element_size()
