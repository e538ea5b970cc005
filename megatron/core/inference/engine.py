"""Cached forward passes of a single-process DeepSeekModel for generation and scoring.

`InferenceEngine` holds preallocated latent caches (one per decoder layer and per MTP depth used)
for a fixed batch size and maximum length, and runs the model's own modules (embedding, norms,
projections, dense MLPs, experts, head) on new tokens:

    engine = InferenceEngine(model, batch_size=2, max_len=64)
    engine.set_starts(starts)                       # [b] first real slot of each row (left padding)
    hidden = engine.forward(tokens, slots)          # [b, s] tokens written at cache slots [b, s]
    logits = engine.logits(hidden)                  # [b, s, V] fp32

Slots are per row, so rows may advance by different amounts; a row's rope position is
slot - start. Attention is the absorbed latent form (`mla_absorbed.py`), the MoE is dropless
(`moe_dropless.py`). Nothing in the model is modified; the engine only reads it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from megatron.core.inference.kv_cache import LatentCache
from megatron.core.inference.mla_absorbed import absorbed_attention, attention_mask
from megatron.core.inference.moe_dropless import check_single_process_moe, dropless_moe


def check_inference_model(model: nn.Module) -> None:
    """ValueError unless `model` is a whole DeepSeekModel in one process (no TP / PP / EP split)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers"):
        raise ValueError(f"expected a DeepSeekModel, got {type(model).__name__}")
    tp = getattr(model, "tp", None)
    if tp is not None and tp.enabled:
        raise ValueError("inference needs a single-process model; this one is tensor-parallel")
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("inference needs the whole model; this one is a pipeline stage")
    if len(model.layers) != config.num_layers:
        raise ValueError(f"the model holds {len(model.layers)} of {config.num_layers} decoder layers")
    for layer in model.layers.values():
        if layer.is_moe:
            check_single_process_moe(layer.mlp)


class InferenceEngine:
    """Latent caches + cached forward of the main model and of the first `mtp_depths` MTP depths.

    Args:
        model: a single-process DeepSeekModel (evaluation only; its parameters are read).
        batch_size, max_len: cache shape; every slot index must be < max_len.
        mtp_depths: how many MTP depths get a cache (self-speculative drafting).
        static_moe: fixed-shape MoE dispatch (default: True on HPU, where graphs need it).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_len: int,
        *,
        mtp_depths: int = 0,
        static_moe: Optional[bool] = None,
    ) -> None:
        check_inference_model(model)
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch size and maximum length must be positive, got {batch_size}, {max_len}")
        available = len(getattr(model, "mtp", []))
        if not 0 <= mtp_depths <= available:
            raise ValueError(f"asked for {mtp_depths} MTP depths but the model has {available}")
        self.model = model
        self.config = model.config
        param = model.embedding.weight
        self.device, self.dtype = param.device, param.dtype
        self.static_moe = self.device.type == "hpu" if static_moe is None else static_moe
        self.batch_size, self.max_len = batch_size, max_len
        mla = self.config.mla
        self.layers = [model.layers[i] for i in range(self.config.num_layers)]
        self.caches = [LatentCache.allocate(batch_size, max_len, mla, self.dtype, self.device) for _ in self.layers]
        self.mtp = [model.mtp[d] for d in range(mtp_depths)]
        self.mtp_caches = [LatentCache.allocate(batch_size, max_len, mla, self.dtype, self.device) for _ in self.mtp]
        self.starts = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    # ---- state ----------------------------------------------------------------------------------
    def set_starts(self, starts: torch.Tensor) -> None:
        """First real (non-padding) slot of each row, [b] int64."""
        if starts.shape != (self.batch_size,):
            raise ValueError(f"starts must have shape [{self.batch_size}], got {tuple(starts.shape)}")
        self.starts = starts.to(device=self.device, dtype=torch.long)

    def cache_bytes_per_token(self) -> int:
        """Bytes cached per token over the main model's layers (MTP caches excluded)."""
        return sum(c.nbytes_per_token() for c in self.caches)

    # ---- forward pieces ---------------------------------------------------------------------------
    def _check_slots(self, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        assert tokens.shape == slots.shape and tokens.shape[0] == self.batch_size, (tokens.shape, slots.shape)

    def _positions(self, slots: torch.Tensor) -> torch.Tensor:
        # Rope position of a slot within its row; padding slots get 0 (their output is never read).
        return (slots - self.starts.unsqueeze(-1)).clamp(min=0)

    def _decoder_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        rotary: Tuple[torch.Tensor, torch.Tensor],
        cache: LatentCache,
        slots: torch.Tensor,
        mask: torch.Tensor,
        kv_len: Optional[int],
    ) -> torch.Tensor:
        """DecoderLayer's pre-norm residual block on new tokens [b, s, H] -> [b, s, H]."""
        attn_in = layer.input_layernorm(hidden)
        hidden = hidden + absorbed_attention(layer.self_attn, attn_in, rotary, cache, slots, mask, kv_len)
        normed = layer.post_attention_layernorm(hidden)
        if layer.is_moe:
            return hidden + dropless_moe(layer.mlp, self.config.moe, normed, static=self.static_moe)
        return hidden + layer.mlp(normed)

    def _context(
        self, slots: torch.Tensor, kv_len: Optional[int], dtype: torch.dtype
    ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Rotary tables (cos, sin) [b, 1, s, rope/2] for the slots' positions and the attention mask."""
        if kv_len is not None and not 0 < kv_len <= self.max_len:
            raise ValueError(f"kv_len {kv_len} outside (0, {self.max_len}]")
        positions = self._positions(slots)
        rotary = self.model.rotary(slots.shape[1], device=self.device, dtype=dtype, position_ids=positions)
        mask = attention_mask(slots, self.starts, kv_len or self.max_len)  # [b, 1, s, L]
        return rotary, mask

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """Main decoder stack on tokens [b, s] stored at cache slots [b, s] -> hidden [b, s, H]
        (before the final norm; MTP depth 1 reads it). Attends over the first `kv_len` slots
        (all when None: static shapes); `kv_len` must exceed every slot attended from."""
        self._check_slots(tokens, slots)
        hidden = self.model.embedding(tokens)  # [b, s, H]
        rotary, mask = self._context(slots, kv_len, hidden.dtype)
        for layer, cache in zip(self.layers, self.caches):
            hidden = self._decoder_layer(layer, hidden, rotary, cache, slots, mask, kv_len)
        return hidden

    def _vocab_logits(self, normed: torch.Tensor) -> torch.Tensor:
        # The head may have more rows than config.vocab_size (padding for divisibility); those
        # columns are not tokens and are dropped here. [..., H] -> fp32 [..., V].
        return self.model.output_layer(normed)[..., : self.config.vocab_size].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Main head: hidden [..., H] -> fp32 logits [..., V] over config.vocab_size."""
        return self._vocab_logits(self.model.final_layernorm(hidden))

    def mtp_forward(
        self,
        depth: int,
        prev_hidden: torch.Tensor,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """MTP depth `depth` (0-based) at slots [b, s]: prev_hidden [b, s, H] is the previous depth's
        (or the main stack's) output at those slots, tokens [b, s] the tokens `depth + 1` places
        later. Returns this depth's hidden [b, s, H] (MTPDepth.forward, cached)."""
        self._check_slots(tokens, slots)
        module = self.mtp[depth]
        embeds = self.model.embedding(tokens)
        mixed = module.eh_proj(torch.cat((module.enorm(embeds), module.hnorm(prev_hidden)), dim=-1))
        rotary, mask = self._context(slots, kv_len, mixed.dtype)
        return self._decoder_layer(module.layer, mixed, rotary, self.mtp_caches[depth], slots, mask, kv_len)

    def mtp_logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """Shared head after MTP depth `depth`'s own final norm -> fp32 logits [..., V]."""
        return self._vocab_logits(self.mtp[depth].final_layernorm(hidden))
