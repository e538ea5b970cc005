"""Activation memory: the bytes autograd keeps for backward per micro-batch, by module.

Counted from what each op of the model's forward saves (megatron/core/transformer/*), one
storage counted once, parameters excluded. Notation, per rank and micro-batch: T = b x s tokens
of the micro-batch, Tl = T / tp under sequence parallelism (else T), p = parameter bytes (2 bf16,
4 fp32), n = heads / tp, H hidden. Main terms:

- RMSNorm on [N, D]: fp32 input copy (the input itself for fp32) 4ND, rsqrt 4N, normalised
  value pND; its output pND is kept by the next matmul.
- MLA: the block input (all-gathered to the full sequence under SP) pTH; the q / kv latent norms;
  per head q, k, v and the attention output (torch SDPA flash kernels keep q, k, v, out and an
  fp32 logsumexp, never the s x s scores; the output is q/k wide where v is passed as a wide view
  of the kv projection, v wide on CUDA's cuDNN path); the o_proj input.
- Dense SwiGLU (F / tp wide): the gate/up GEMM output, silu output and product, 4pTF.
- MoE on Tm = Tl tokens: router scores (fp32) and routing indices; the rows given to the experts
  (N x H: T k for the all-to-all dispatcher, a static W T min(k, E/EP) for the all-gather one);
  per computed row the gate/up output, silu output and product (4I; the tiled fallback keeps
  only the gate/up output of its tiles), see `expert_rows`; the combine's fp32 copy of the expert
  outputs per assignment (4 Tm k H, x W for all-gather); shared experts.
- Last stage: final norm, output-head input, and the fp32 softmax of the cross entropy (4 T V/tp)
  for the main head and each MTP depth (whose embedding, norms, eh_proj and layer add up too).
- Recompute: selective core_attn drops the attention output and logsumexp; selective moe keeps
  only the MoE input; full keeps each checkpointed chunk's input, and backward rebuilds one
  chunk at a time (a transient counted in memory.py).

Routing in an untrained model is close to uniform, so the all-to-all dispatcher's per-rank rows
are taken at their balanced value T k; a skewed router moves rows between EP ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.training.planning.layout import Layout
from megatron.training.planning.params import embedding_rows

INDEX_BYTES = 8  # int64 routing indices and token ids


@dataclass
class Breakdown:
    """Bytes by category; `largest` is the largest single saved tensor (sizes the backward transient)."""

    parts: Dict[str, float] = field(default_factory=dict)
    largest: float = 0.0

    def add(self, key: str, value: float, tensor: float = 0.0) -> None:
        self.parts[key] = self.parts.get(key, 0.0) + value
        self.largest = max(self.largest, tensor)

    def merge(self, other: "Breakdown", times: float = 1.0) -> None:
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v * times
        self.largest = max(self.largest, other.largest)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _norm(n_tokens: float, width: int, p: int) -> float:
    """RMSNorm saves: fp32 input (copy) 4ND, rsqrt 4N, normalised value pND."""
    return 4 * n_tokens * width + 4 * n_tokens + p * n_tokens * width


def attention(c: DeepSeekConfig, lay: Layout) -> Breakdown:
    """One MLA block with its input norm."""
    m, h, p = c.mla, c.hidden_size, lay.param_bytes
    t, tl, n = lay.tokens_per_microbatch, lay.local_tokens, m.num_heads // lay.tp
    out = Breakdown()
    out.add("attention", _norm(tl, h, p) + p * t * h, p * t * h)
    if m.q_lora_rank is not None:
        # q_a output -> q_a_layernorm (fp32 copy, rsqrt, normed) -> its output kept by q_b_proj.
        out.add("attention", 4 * t * m.q_lora_rank + 4 * t + 2 * p * t * m.q_lora_rank)
    # kv_a_layernorm reads a slice of the [latent | k_rope] projection: fp32 keeps that whole
    # projection (the slice is a view of it), bf16 an fp32 copy of the latent.
    kv_in = m.kv_lora_rank + m.qk_rope_head_dim if p == 4 else m.kv_lora_rank
    out.add("attention", 4 * t * kv_in + 4 * t + 2 * p * t * m.kv_lora_rank)
    q = p * t * n * m.qk_head_dim
    kv = p * t * n * (m.qk_nope_head_dim + m.v_head_dim)
    if m.qk_head_dim - m.v_head_dim > m.qk_nope_head_dim:
        kv = q  # v is zero-padded to the q/k head size before SDPA, which keeps that copy instead
    # query (q with its rope slice rotated in place), key, and the kv projection whose window is v.
    out.add("attention", 2 * q + kv, max(q, kv))
    if not lay.recompute_granularity == "selective" or "core_attn" not in lay.recompute_modules:
        # SDPA output and fp32 logsumexp. The output is v wide where the kernel takes the narrow
        # value (CUDA cuDNN), q/k wide where it gets the wide view of the kv projection.
        narrow = lay.device_kind == "cuda" or m.qk_head_dim <= m.v_head_dim
        out.add("attention", (p * t * n * m.v_head_dim if narrow else q) + 4 * t * n)
    out.add("attention", p * t * n * m.v_head_dim)  # o_proj input
    return out


def dense_mlp(c: DeepSeekConfig, lay: Layout) -> Breakdown:
    """post_attention_layernorm + SwiGLU MLP split over TP."""
    h, p = c.hidden_size, lay.param_bytes
    t, tl = lay.tokens_per_microbatch, lay.local_tokens
    f = c.ffn_hidden_size // lay.tp
    out = Breakdown()
    out.add("mlp", _norm(tl, h, p) + p * t * h + 4 * p * t * f, 2 * p * t * f)
    return out


def expert_rows(c: DeepSeekConfig, lay: Layout) -> Tuple[float, float, float]:
    """(buffer rows, rows whose activations the experts keep, rows they multiply) per MoE layer,
    micro-batch and rank.

    Buffer: T k for one device (dropped assignments stay at its tail), the kept rows for the
    all-to-all dispatcher (balanced routing), W T min(k, E/EP) for the all-gather one (a static
    size), E C slots with padding to capacity. Grouped GEMM keeps outputs for the whole buffer but
    multiplies only its valid prefix; the CPU per-expert loop keeps and multiplies the valid rows
    (about T k, or the kept ones); the tiled fallback of accelerators without grouped GEMM keeps
    and multiplies ceil(N / B) + E_local tiles of B = ceil(N / E_local) rows (at most 2N).
    """
    moe = c.moe
    tm, k, e = lay.local_tokens, moe.topk, moe.num_experts
    ep = lay.ep
    cap = None if moe.capacity_factor is None else max(1, math.ceil(tm * k / e * moe.capacity_factor))
    if moe.pad_to_capacity and cap is not None:
        return e * cap, e * cap, e * cap  # E_local x (EP x C) slots (EP = 1: E x C), batched GEMM
    kept = tm * k if cap is None else min(tm * k, e * cap)
    if ep > 1 and lay.dispatcher == "allgather":
        buffer = ep * tm * min(k, e // ep)
    elif ep > 1:
        buffer = kept  # all-to-all sends only kept rows
    else:
        buffer = tm * k
    if lay.expert_path == "grouped":
        return buffer, buffer, kept
    if lay.expert_path == "tiled":
        e_local = e // ep
        block = math.ceil(buffer / e_local)
        tiles = (math.ceil(buffer / block) + e_local) * block
        return buffer, tiles, tiles
    return buffer, kept, kept


def moe_mlp(c: DeepSeekConfig, lay: Layout) -> Breakdown:
    """post_attention_layernorm + router + dispatch + routed and shared experts."""
    moe, h, p = c.moe, c.hidden_size, lay.param_bytes
    tm, k, e = lay.local_tokens, moe.topk, moe.num_experts
    out = Breakdown()
    out.add("mlp", _norm(tm, h, p))
    if lay.recompute_granularity == "selective" and "moe" in lay.recompute_modules:
        out.add("recompute_inputs", p * tm * h)  # only the checkpointed MoE input
        return out
    out.add("moe_router", p * tm * h)  # the MoE input, kept by the router and shared experts
    router = 4 * tm * e  # fp32 scores
    if p != 4:
        router += 4 * tm * h + 4 * e * h  # fp32 copies of the input and gate weight
    if moe.num_groups > 1:
        router += tm * e  # group mask (bool)
        router += INDEX_BYTES * tm * moe.num_groups * (2 if moe.score_function == "sigmoid" else 1)
    router += INDEX_BYTES * tm * k + 4 * tm * k + 4 * tm  # top-k indices, weights, their norm
    if moe.load_balancing_type != "none":
        router += 8 * tm  # per-token score sums and mask
    if moe.z_loss_coeff:
        router += 4 * tm * e
    out.add("moe_router", router)
    n, computed, _ = expert_rows(c, lay)
    world = lay.ep if lay.ep > 1 and lay.dispatcher == "allgather" else 1
    # Rows entering the experts (kept by the first GEMM) and the permutation indices.
    out.add("moe_dispatch", p * n * h + INDEX_BYTES * tm * k + (2 * n if world > 1 else 0), p * n * h)
    ffn = moe.ffn_hidden_size
    if lay.expert_path == "tiled" and not moe.pad_to_capacity:
        # Tiled fallback: keeps only each tile's gate/up output (silu and product are rebuilt in backward).
        out.add("moe_experts", 2 * p * computed * ffn, 2 * p * computed * ffn)
    else:
        # gate/up GEMM output (2I), silu output (I), product (I).
        out.add("moe_experts", 4 * p * computed * ffn, 2 * p * computed * ffn)
    # Combine: fp32 expert output per (token, choice), the weights and row indices.
    combine = 4 * world * tm * k * h
    out.add("moe_dispatch", combine + (4 + INDEX_BYTES + (1 if world > 1 else 0)) * world * tm * k, combine)
    if moe.num_shared_experts:
        out.add("moe_shared", 4 * p * tm * moe.ffn_hidden_size * moe.num_shared_experts)
    return out


def decoder_layer(c: DeepSeekConfig, lay: Layout, layer_idx: int) -> Breakdown:
    out = attention(c, lay)
    out.merge(moe_mlp(c, lay) if c.is_moe_layer(layer_idx) else dense_mlp(c, lay))
    return out


def head(c: DeepSeekConfig, lay: Layout) -> Breakdown:
    """Final norm, output head input and the cross entropy's fp32 softmax (main head)."""
    h, p = c.hidden_size, lay.param_bytes
    t, tl = lay.tokens_per_microbatch, lay.local_tokens
    v_local = embedding_rows(c, lay.tp) // lay.tp
    out = Breakdown()
    out.add("head", _norm(tl, h, p) + p * t * h + INDEX_BYTES * t + (t if lay.tp > 1 else 0))
    out.add("logits", 4 * t * v_local, 4 * t * v_local)
    return out


def mtp_depth(c: DeepSeekConfig, lay: Layout, depth: int) -> Breakdown:
    """One MTP depth: embedding of the shifted ids, enorm/hnorm, eh_proj, a layer, its head."""
    h, p = c.hidden_size, lay.param_bytes
    t, tl = lay.tokens_per_microbatch, lay.local_tokens
    out = Breakdown()
    hnorm = _norm(tl, h, p) - (4 * tl * h if p == 4 else 0)  # fp32: its input is kept already
    out.add("mtp", INDEX_BYTES * t + _norm(tl, h, p) + hnorm + 2 * p * tl * h)
    layer = decoder_layer(c, lay, c.num_layers + depth)
    for key, value in layer.parts.items():
        out.add(key, value)
    out.largest = max(out.largest, layer.largest)
    out.merge(head(c, lay))
    return out


def stage_activations(c: DeepSeekConfig, lay: Layout, stage: int) -> Breakdown:
    """Bytes kept for backward by one micro-batch on one rank of `stage` (see module docstring)."""
    start, end = lay.stage_ranges[stage]
    first, last = stage == 0, stage == lay.pp - 1
    h, p, tl, t = c.hidden_size, lay.param_bytes, lay.local_tokens, lay.tokens_per_microbatch
    out = Breakdown()
    # Rotary tables for this micro-batch's positions ([b, 1, s, rope/2] cos and sin).
    table = 4 if (c.rope.interleave and not c.rope.interleave_output_permuted) else p
    out.add("other", t * c.mla.qk_rope_head_dim * table)
    if first:
        out.add("other", INDEX_BYTES * t + (t if lay.tp > 1 else 0))  # token ids (vocab-parallel mask)
    elif p != 4:
        out.add("other", p * tl * h)  # received activation (fp32: kept by the first norm)
    if not last:
        out.add("other", p * tl * h)  # stage output held until its gradient arrives
    checkpointed, _ = lay.recompute_full_chunks(end - start)
    for offset, i in enumerate(range(start, end)):
        if offset < checkpointed:
            chunk = lay.recompute_num_layers or 1
            if lay.recompute_method == "block" or offset % chunk == 0:
                out.add("recompute_inputs", p * tl * h)
            continue
        out.merge(decoder_layer(c, lay, i))
    if last:
        out.merge(head(c, lay))
        for d in range(c.mtp.num_layers):
            out.merge(mtp_depth(c, lay, d))
    return out


def recompute_peak(c: DeepSeekConfig, lay: Layout, stage: int) -> float:
    """Bytes one recomputed unit holds while backward rebuilds it: a checkpointed chunk of full
    recompute, or one MoE MLP of selective moe recompute, plus its largest saved tensor (the
    gradient being formed). 0 without recompute of whole modules."""
    start, end = lay.stage_ranges[stage]
    checkpointed, chunk = lay.recompute_full_chunks(end - start)
    plain = Layout(**{**lay.__dict__, "recompute_granularity": None, "recompute_method": None,
                      "recompute_num_layers": None, "recompute_modules": ()})
    best = 0.0
    if checkpointed:
        for s in range(start, start + checkpointed, chunk):
            parts = [decoder_layer(c, plain, i) for i in range(s, min(s + chunk, start + checkpointed))]
            best = max(best, sum(b.total for b in parts) + max(b.largest for b in parts))
    elif lay.recompute_granularity == "selective" and "moe" in lay.recompute_modules:
        layers = list(range(start, end))
        if stage == lay.pp - 1:
            layers += [c.num_layers + d for d in range(c.mtp.num_layers)]
        for i in layers:
            if c.is_moe_layer(i):
                full = moe_mlp(c, plain)
                best = max(best, full.total + full.largest)
    return best


# Parts of the last stage whose backward runs first (their saved tensors are gone by the time
# backward recomputes anything in the decoder layers).
HEAD_PARTS = ("head", "logits", "mtp")
