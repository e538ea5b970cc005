"""Rotary position embedding of MLA's decoupled rope slice, with optional YaRN scaling.

MLA rotates only the `qk_rope_head_dim` slice of each query head and the single shared rope key
(DeepSeek-V2 paper, section 2.1.3). Three layouts of that slice are supported, matching the three
ways Hugging Face's DeepSeek models apply it:

- ``interleave=True, interleave_output_permuted=True`` (HF V3, ``rope_interleave=True``): pairs
  (x[2i], x[2i+1]) rotate by angle i; the output is laid out as [rotated evens | rotated odds].
- ``interleave=True, interleave_output_permuted=False`` (HF V2): the same pair rotation done as a
  complex product in fp32; the output stays interleaved.
- ``interleave=False``: standard rotate-half, pairs (x[i], x[i + d/2]).

The first two give identical q.k products (the same permutation hits q and k); the flag only
matters when intermediate tensors are compared with HF.

Tables hold one angle per pair, shape [..., seq, d/2]. They are built once (cached per device
and dtype for the positions 0..L-1) and shared by every layer of a forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from megatron.core.config import MLAConfig, RopeConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term m(s, k) = 0.1 * k * ln(s) + 1 (1.0 when s <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(rope: RopeConfig) -> float:
    """Multiplier applied to the cos/sin tables.

    Plain RoPE: 1. YaRN: m(factor, mscale) / m(factor, mscale_all_dim) when both are non-zero;
    otherwise m(factor, 1), which is what HF does when either is missing (and what DeepSeek's
    ratio gives for the default mscale=1, mscale_all_dim=0). DeepSeek's released configs set
    mscale == mscale_all_dim, making the multiplier exactly 1: the temperature then lives in the
    softmax scale instead (see `softmax_scale`).
    """
    if rope.scaling_type != "yarn":
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor, 1.0)


def softmax_scale(mla: MLAConfig, rope: RopeConfig) -> float:
    """Attention logit scale: qk_head_dim^-0.5, times m(factor, mscale_all_dim)^2 under YaRN.

    The nope and rope parts of a head are one dot product, so the scale uses the full
    qk_head_dim (nope + rope), e.g. 192^-0.5 * 1.873854 = 0.1352338 for DeepSeek-V3.
    """
    scale = mla.qk_head_dim ** -0.5
    if rope.scaling_type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, original_max_pos: int) -> float:
    """The (fractional) dimension index whose wavelength fits `num_rotations` times in the original context."""
    return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(dim: int, rope: RopeConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies [dim/2] in fp32, one per rotated pair.

    Plain: theta^(-2i/dim). YaRN blends the interpolated frequencies (divided by `factor`) with
    the original ones: dimensions that rotate more than beta_fast times over the original context
    keep the original frequency, those below beta_slow are fully interpolated, and a linear ramp
    over the (floored / ceiled, clipped) correction range blends the ones in between.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dimension must be a positive even number, got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim  # [dim/2]
    base_freq = rope.theta ** exponents  # wavelength / (2 pi) per pair
    inv_freq = 1.0 / base_freq
    if rope.scaling_type != "yarn":
        return inv_freq
    interpolated = 1.0 / (rope.factor * base_freq)
    low = math.floor(_yarn_correction_dim(rope.beta_fast, dim, rope.theta, rope.original_max_position_embeddings))
    high = math.ceil(_yarn_correction_dim(rope.beta_slow, dim, rope.theta, rope.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0.0, 1.0)
    keep_original = 1.0 - ramp  # 1 for high-frequency pairs (extrapolate), 0 for low ones
    return interpolated * (1.0 - keep_original) + inv_freq * keep_original


def _keeps_fp32_tables(rope: RopeConfig) -> bool:
    # HF V2's complex rotation multiplies in fp32 with fp32 tables; V3 and rotate-half cast the
    # tables to the activation dtype first.
    return rope.interleave and not rope.interleave_output_permuted


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rope slice for a set of positions.

    Holds no parameters or buffers (so it adds nothing to a state dict and is not cast by
    `module.to(dtype)`); the fp32 inverse frequencies are computed on the CPU whatever the default
    device (a model built on the meta device needs nothing rebuilt here) and copied to a device on
    first use. The table
    for positions 0..L-1 is cached per (device, dtype) and grown on demand, so with a fixed
    sequence length it is computed once per training run.
    """

    def __init__(self, dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.dim = dim
        self.rope = rope
        self.attention_factor = rope_attention_factor(rope)
        # [dim/2] fp32, always built on the CPU (even under `with torch.device("meta")`) and kept out
        # of parameters/buffers, so meta-device construction + to_empty / checkpoint loading (which
        # only touch parameters and buffers) leave it real; copied to a device on first use.
        self._inv_freq_cpu = rope_inv_freq(dim, rope, device=torch.device("cpu"))
        self._inv_freq_on: Dict[torch.device, torch.Tensor] = {}
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def inv_freq(self) -> torch.Tensor:
        """[dim/2] fp32 inverse frequencies (on the CPU)."""
        return self._inv_freq_cpu

    @inv_freq.setter
    def inv_freq(self, value: torch.Tensor) -> None:
        # Kept for callers that rebuilt the attribute after meta-device construction (no longer needed).
        self._inv_freq_cpu = value.detach().to("cpu", torch.float32)
        self._inv_freq_on.clear()
        self._cache.clear()

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        inv_freq = self._inv_freq_on.get(device)
        if inv_freq is None:
            with torch.inference_mode(False):
                inv_freq = self._inv_freq_on[device] = self._inv_freq_cpu.to(device)
        return inv_freq

    def table_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        """dtype of the tables for activations of `activation_dtype` (fp32 for the V2 complex layout)."""
        return torch.float32 if _keeps_fp32_tables(self.rope) else activation_dtype

    def _angles(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # positions [...] -> fp32 cos, sin [..., dim/2], scaled by the YaRN attention factor.
        inv_freq = self._inv_freq(positions.device)
        freqs = positions.float()[..., None] * inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def forward(
        self,
        seq_len: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        position_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to [batch, heads, seq, dim/2].

        position_ids None: positions 0..seq_len-1 from the cache, shape [1, 1, seq, dim/2].
        position_ids [batch, seq] (or [seq]): computed for those positions, [batch, 1, seq, dim/2];
        no host sync is needed to size a cache.
        """
        out_dtype = self.table_dtype(dtype)
        if position_ids is not None:
            if position_ids.dim() == 1:
                position_ids = position_ids[None]
            cos, sin = self._angles(position_ids.to(device))
            return cos.to(out_dtype)[:, None], sin.to(out_dtype)[:, None]
        key = (torch.device(device), out_dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < seq_len:
            # Normal (not inference-mode) tensors, so a table first built during evaluation can
            # still be saved for backward in training.
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self._angles(torch.arange(seq_len, device=device))  # [seq, dim/2]
                cached = (cos.to(out_dtype), sin.to(out_dtype))
            self._cache[key] = cached
        return cached[0][None, None, :seq_len], cached[1][None, None, :seq_len]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig, fused: Optional[Any] = None
) -> torch.Tensor:
    """Rotate the rope slice x [batch, heads, seq, d] with tables cos/sin [.., seq, d/2].

    Returns the same shape and dtype as x, in the layout chosen by `rope` (module docstring).
    `fused`: Intel's rotate-half kernel (`Device.fused_rope()`), used by `fused_rotary` for the
    two layouts it expresses exactly; None uses the torch formulas.
    """
    if fused is not None and fused_rope_fits(rope):
        return fused_rotary(fused, x, cos, sin, rope)
    if not rope.interleave:
        first, second = x.chunk(2, dim=-1)  # pairs (x[i], x[i + d/2])
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    if rope.interleave_output_permuted:
        even, odd = x[..., 0::2], x[..., 1::2]  # pairs (x[2i], x[2i+1])
        return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    # V2: complex rotation in fp32, result re-interleaved as (real, imag) pairs.
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., d/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.float(), sin.float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def fused_rope_fits(rope: RopeConfig) -> bool:
    """Intel's rotate-half kernel reproduces rotate-half (interleave=False) and HF V3's layout
    (interleaved pairs, output [rotated evens | rotated odds]) exactly; HF V2's fp32 complex
    rotation with interleaved output keeps the torch formula."""
    return not rope.interleave or rope.interleave_output_permuted


def fused_rotary(fused: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """`apply_rotary` through Intel's RotaryPosEmbeddingHelperV1: apply(x, cos2, sin2, 0) =
    x * cos2 + rotate_half(x) * sin2 with full-width tables cos2 = [cos | cos], sin2 = [sin | sin].

    For V3's layout the input is first de-interleaved to [evens | odds] (pairs (x[2i], x[2i+1])
    become (x'[i], x'[i + d/2])), after which V3's output is exactly rotate-half's.
    """
    if rope.interleave:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)  # [..., d]: [evens | odds]
    cos2 = torch.cat((cos, cos), dim=-1).to(x.dtype)  # [.., seq, d]
    sin2 = torch.cat((sin, sin), dim=-1).to(x.dtype)
    return fused.apply(x, cos2, sin2, 0)
