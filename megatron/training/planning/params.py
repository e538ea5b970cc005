"""Parameters of the DeepSeek model, per pipeline stage and rank, without building the model.

`stage_parameters` lists, in the model's registration order, every parameter one rank of a stage
holds (names as in `DeepSeekModel.named_parameters()`, per-rank shapes after the tensor-parallel
and expert-parallel split), with the attributes the gradient and optimizer code reads. The order
matters: `DistributedDataParallel` lays its gradient buffers out in reverse registration order,
and `memory.py` replays that layout to get exact buffer and optimizer-shard sizes.

Splits (megatron/core/tensor_parallel/layers.py, transformer/mla.py, moe/moe_layer.py):
- column-parallel (rows / TP): q_proj or q_b_proj, kv_b_proj, dense gate_up_proj, output_layer;
- row-parallel (columns / TP): o_proj, dense down_proj (a bias stays whole);
- vocabulary rows / TP: the embedding (when TP > 1);
- replicated over TP: norms, q_a_proj, kv_a_proj_with_mqa, the router, the shared experts, MTP eh_proj;
- routed experts: E / EP stacked experts per rank (`is_expert`, reduced over the EDP group).

Activated parameters per token (`model_counts`): every non-expert parameter except the input
embedding table (a row lookup, not a matmul) plus top-k routed experts per MoE layer. This is
the convention of DeepSeek's published figures (V3 37B, V2 21B, V2-Lite 2.4B); the count with
the embedding is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron.core.config import DeepSeekConfig


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as held by one rank."""

    name: str
    shape: Tuple[int, ...]
    is_expert: bool = False
    shared_embedding: bool = False  # embedding copy on the first and last stage (summed over "embedding")
    sequence_parallel: bool = False  # replicated over TP but fed this rank's tokens under SP

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def decays(self) -> bool:
        """Megatron's weight-decay rule (optimizer.uses_weight_decay): not biases, not 1-D."""
        return not (len(self.shape) <= 1 or self.name.endswith(".bias"))


def _div(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by {d}")
    return n // d


def _norm(name: str, size: int, sp: bool) -> List[ParamInfo]:
    return [ParamInfo(f"{name}.weight", (size,), sequence_parallel=sp)]


def _mla(prefix: str, c: DeepSeekConfig, tp: int, sp: bool) -> List[ParamInfo]:
    m, h = c.mla, c.hidden_size
    n_local = _div(m.num_heads, tp, "attention heads")
    out: List[ParamInfo] = []
    if m.q_lora_rank is None:
        out.append(ParamInfo(f"{prefix}.q_proj.weight", (n_local * m.qk_head_dim, h)))
    else:
        out.append(ParamInfo(f"{prefix}.q_a_proj.weight", (m.q_lora_rank, h)))
        if m.attention_bias:
            out.append(ParamInfo(f"{prefix}.q_a_proj.bias", (m.q_lora_rank,)))
        out.append(ParamInfo(f"{prefix}.q_a_layernorm.weight", (m.q_lora_rank,)))
        out.append(ParamInfo(f"{prefix}.q_b_proj.weight", (n_local * m.qk_head_dim, m.q_lora_rank)))
    out.append(ParamInfo(f"{prefix}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, h)))
    if m.attention_bias:
        out.append(ParamInfo(f"{prefix}.kv_a_proj_with_mqa.bias", (m.kv_lora_rank + m.qk_rope_head_dim,)))
    out.append(ParamInfo(f"{prefix}.kv_a_layernorm.weight", (m.kv_lora_rank,)))
    out.append(ParamInfo(f"{prefix}.kv_b_proj.weight", (n_local * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)))
    out.append(ParamInfo(f"{prefix}.o_proj.weight", (h, n_local * m.v_head_dim)))
    if m.attention_bias:
        # Row-parallel bias: whole on every rank, added after the reduction (SP-marked under SP).
        out.append(ParamInfo(f"{prefix}.o_proj.bias", (h,), sequence_parallel=sp))
    return out


def _swiglu(prefix: str, hidden: int, ffn: int, tp: int, sp: bool) -> List[ParamInfo]:
    """SwiGLUMLP: gate_up_proj [2F(/tp), H], down_proj [H, F(/tp)] (no biases in DeepSeek)."""
    f_local = _div(ffn, tp, "MLP ffn size")
    return [
        ParamInfo(f"{prefix}.gate_up_proj.weight", (2 * f_local, hidden), sequence_parallel=sp),
        ParamInfo(f"{prefix}.down_proj.weight", (hidden, f_local), sequence_parallel=sp),
    ]


def _decoder_layer(prefix: str, c: DeepSeekConfig, layer_idx: int, tp: int, ep: int, sp: bool) -> List[ParamInfo]:
    h = c.hidden_size
    out = _norm(f"{prefix}.input_layernorm", h, sp)
    out += _mla(f"{prefix}.self_attn", c, tp, sp)
    out += _norm(f"{prefix}.post_attention_layernorm", h, sp)
    if c.is_moe_layer(layer_idx):
        moe = c.moe
        e_local = _div(moe.num_experts, ep, "num_experts over the expert-parallel size")
        out.append(ParamInfo(f"{prefix}.mlp.router.weight", (moe.num_experts, h), sequence_parallel=sp))
        out.append(ParamInfo(f"{prefix}.mlp.experts.gate_up_proj", (e_local, 2 * moe.ffn_hidden_size, h), is_expert=True))
        out.append(ParamInfo(f"{prefix}.mlp.experts.down_proj", (e_local, h, moe.ffn_hidden_size), is_expert=True))
        if moe.num_shared_experts > 0:
            # Replicated over TP (a plain SwiGLUMLP), so SP-marked.
            out += _swiglu(f"{prefix}.mlp.shared_experts", h, moe.ffn_hidden_size * moe.num_shared_experts, 1, sp)
    else:
        out += _swiglu(f"{prefix}.mlp", h, c.ffn_hidden_size, tp, False)
    return out


def stage_parameters(
    c: DeepSeekConfig,
    tp: int,
    ep: int,
    sequence_parallel: bool,
    layer_range: Tuple[int, int],
    pre_process: bool,
    post_process: bool,
) -> List[ParamInfo]:
    """Parameters of one rank of a stage, in registration order (see module docstring)."""
    sp = sequence_parallel and tp > 1
    h = c.hidden_size
    v_local = _div(embedding_rows(c, tp), tp, "vocabulary") if tp > 1 else embedding_rows(c, tp)
    out: List[ParamInfo] = []
    mtp = c.mtp.num_layers
    if pre_process or (post_process and mtp > 0):
        shared = pre_process != post_process and mtp > 0
        out.append(ParamInfo("embedding.weight", (v_local, h), shared_embedding=shared))
    start, end = layer_range
    for i in range(start, end):
        out += _decoder_layer(f"layers.{i}", c, i, tp, ep, sp)
    if post_process:
        out += _norm("final_layernorm", h, sp)
        if not (c.tie_word_embeddings and (pre_process or mtp > 0)):
            out.append(ParamInfo("output_layer.weight", (v_local, h)))
        for d in range(mtp):
            p = f"mtp.{d}"
            out += _norm(f"{p}.enorm", h, sp) + _norm(f"{p}.hnorm", h, sp)
            out.append(ParamInfo(f"{p}.eh_proj.weight", (h, 2 * h), sequence_parallel=sp))
            out += _decoder_layer(f"{p}.layer", c, c.num_layers + d, tp, ep, sp)
            out += _norm(f"{p}.final_layernorm", h, sp)
    return out


def embedding_rows(c: DeepSeekConfig, tp: int) -> int:
    """Rows of the embedding and output head: the vocabulary padded as the model pads it when
    the config pads (`padded_vocab_size`), else the vocabulary as given (already padded)."""
    padded = getattr(c, "padded_vocab_size", None)
    return int(padded(tp)) if callable(padded) else c.vocab_size


def expert_params_per_expert(c: DeepSeekConfig) -> int:
    """gate_up [2I, H] + down [H, I] of one routed expert."""
    return 3 * c.hidden_size * c.moe.ffn_hidden_size


@dataclass(frozen=True)
class ModelCounts:
    """Whole-model counts (one copy of every parameter, no parallel split)."""

    total: int  # every parameter the model builds, MTP depths included
    total_without_mtp: int
    routed_expert: int
    embedding: int
    activated_per_token: int  # published convention: no input embedding, top-k experts
    activated_per_token_with_embedding: int
    activated_per_token_without_mtp: int

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


def model_counts(c: DeepSeekConfig) -> ModelCounts:
    """Parameter counts of the whole model (identical to a model built on the meta device)."""
    params = stage_parameters(c, 1, 1, False, (0, c.num_layers), True, True)
    total = sum(p.numel for p in params)
    mtp = sum(p.numel for p in params if p.name.startswith("mtp."))
    routed = sum(p.numel for p in params if p.is_expert)
    embedding = sum(p.numel for p in params if p.name == "embedding.weight")
    per_expert = expert_params_per_expert(c)
    moe_main = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    moe_mtp = sum(c.is_moe_layer(c.num_layers + d) for d in range(c.mtp.num_layers))
    k = c.moe.topk
    with_emb = total - routed + (moe_main + moe_mtp) * k * per_expert
    mtp_routed = sum(p.numel for p in params if p.name.startswith("mtp.") and p.is_expert)
    main_with_emb = (total - mtp) - (routed - mtp_routed) + moe_main * k * per_expert
    return ModelCounts(
        total=total,
        total_without_mtp=total - mtp,
        routed_expert=routed,
        embedding=embedding,
        activated_per_token=with_emb - embedding,
        activated_per_token_with_embedding=with_emb,
        activated_per_token_without_mtp=main_with_emb - embedding,
    )


def activated_stage_params(c: DeepSeekConfig, params: List[ParamInfo], ep: int) -> int:
    """Parameters one token touches on this rank's stage: non-expert ones (minus the input
    embedding lookup) plus top-k of the stage's experts, counted whole (before the EP split)."""
    per_expert = expert_params_per_expert(c)
    dense = sum(p.numel for p in params if not p.is_expert and p.name != "embedding.weight")
    moe_layers = {p.name.rsplit(".mlp.experts.", 1)[0] for p in params if p.is_expert}
    return dense + len(moe_layers) * c.moe.topk * per_expert


def stage_flags(stage: int, pp: int) -> Tuple[bool, bool]:
    """(pre_process, post_process) of pipeline stage `stage`."""
    return stage == 0, stage == pp - 1


def find(params: List[ParamInfo], name: str) -> Optional[ParamInfo]:
    return next((p for p in params if p.name == name), None)
