"""Megatron model flags <-> DeepSeekConfig.

`model_config_from_flags` is the one forward path: flags (already merged with a preset) ->
a validated DeepSeekConfig. `flags_from_model_config` is its inverse, used to turn a preset into
flag values, so that a preset plus explicit overrides goes through the same path as plain flags.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple, Union

from megatron.core.config import DeepSeekConfig, KernelConfig, MLAConfig, MoEConfig, MTPConfig, RopeConfig

YARN_DEFAULT_ORIGINAL_POSITIONS = 4096  # Megatron's MLATransformerConfig default


class LayerSplit(NamedTuple):
    """A preset's dense/MoE layout (first_k_dense, moe_layer_freq) carried through the flag dict;
    unlike a 0/1 list it stays valid when --num-layers is overridden."""

    first_k_dense: int
    every: int


def dense_moe_split(freq: Union[int, List[int], LayerSplit], num_layers: int) -> Tuple[int, int]:
    """--moe-layer-freq -> (first_k_dense, moe_layer_freq) of DeepSeekConfig.

    An int N is Megatron's "layer i is MoE when i % N == 0"; a 0/1 list must be k dense layers
    followed by MoE layers (every N-th, usually every one), the only layouts DeepSeek uses.
    """
    if isinstance(freq, LayerSplit):
        return freq.first_k_dense, freq.every
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq must be >= 1, got {freq}")
        return 0, freq
    if len(freq) != num_layers:
        raise ValueError(f"--moe-layer-freq pattern has {len(freq)} entries but --num-layers is {num_layers}")
    if 1 not in freq:
        return num_layers, 1
    first = freq.index(1)
    ones = [i for i, x in enumerate(freq) if x == 1]
    every = ones[1] - ones[0] if len(ones) > 1 else 1
    expected = [0] * first + [1 if (i - first) % every == 0 else 0 for i in range(first, num_layers)]
    if freq != expected:
        raise ValueError(
            "--moe-layer-freq pattern must be k dense layers (0) followed by MoE layers (1), e.g. "
            f"'([0]*3+[1]*58)'; got {freq}"
        )
    return first, every


# Core validation messages name DeepSeekConfig fields; users need the flag to change.
_FIELD_FLAGS = (
    (r"\bnum_groups\b", "--moe-router-num-groups"),
    (r"\bgroup_topk\b", "--moe-router-group-topk"),
    (r"\btopk\b", "--moe-router-topk"),
    (r"\bnum_experts\b", "--num-experts"),
    (r"\bfirst_k_dense\b", "--moe-layer-freq"),
    (r"\bnum_layers\b", "--num-layers"),
    (r"\bffn_hidden_size\b", "--ffn-hidden-size / --moe-ffn-hidden-size"),
    (r"\bhidden_size\b", "--hidden-size"),
    (r"\bqk_rope_head_dim\b", "--qk-pos-emb-head-dim"),
    (r"\bqk_nope_head_dim\b", "--qk-head-dim"),
    (r"\bv_head_dim\b", "--v-head-dim"),
    (r"\bkv_lora_rank\b", "--kv-lora-rank"),
    (r"\bq_lora_rank\b", "--q-lora-rank"),
    (r"\bnum_heads\b", "--num-attention-heads"),
    (r"YaRN factor", "--rotary-scaling-factor"),
    (r"beta_fast|beta_slow", "--beta-fast / --beta-slow"),
    (r"rope theta", "--rotary-base"),
    (r"capacity factor", "--moe-expert-capacity-factor"),
    (r"\bnorm_eps\b", "--norm-epsilon"),
    (r"max_position_embeddings", "--max-position-embeddings"),
    (r"mtp", "--mtp-num-layers / --mtp-loss-scaling-factor"),
    (r"vocab_size", "--vocab-size"),
)


def _with_flags(message: str) -> str:
    flags = [flag for pattern, flag in _FIELD_FLAGS if re.search(pattern, message)]
    if not flags or "--" in message:
        return message
    return f"{message} (change {', '.join(dict.fromkeys(flags))})"


def _reject_contradictions(v: Mapping[str, Any], explicit: Set[str]) -> None:
    """Explicit flags asking for an architecture the DeepSeek model does not have."""
    if "normalization" in explicit and v["normalization"] != "RMSNorm":
        raise ValueError(f"--normalization {v['normalization']}: DeepSeek models use RMSNorm")
    if "position_embedding_type" in explicit and v["position_embedding_type"] != "rope":
        raise ValueError(f"--position-embedding-type {v['position_embedding_type']}: DeepSeek MLA uses rope")
    if v["rotary_percent"] != 1.0:
        raise ValueError("--rotary-percent must be 1.0: MLA sets the rotary width with --qk-pos-emb-head-dim")
    for flag in ("attention_dropout", "hidden_dropout"):
        if v[flag] != 0:
            raise ValueError(f"--{flag.replace('_', '-')} {v[flag]}: the DeepSeek model has no dropout (DeepSeek trains with 0)")
    if v["fp16"]:
        raise ValueError("--fp16 is not supported: train in bf16 (--bf16) or fp32 (no precision flag)")


def _required(v: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if v[name] is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (or use --model-preset)")


def _moe_config(v: Mapping[str, Any], ffn: int, notes: List[str]) -> MoEConfig:
    moe_ffn = v["moe_ffn_hidden_size"] if v["moe_ffn_hidden_size"] is not None else ffn
    shared = v["moe_shared_expert_intermediate_size"]
    n_shared = 0
    if shared:
        if moe_ffn <= 0 or shared % moe_ffn:
            raise ValueError(
                f"--moe-shared-expert-intermediate-size ({shared}) must be a multiple of --moe-ffn-hidden-size "
                f"({moe_ffn}): the shared experts are whole experts"
            )
        n_shared = shared // moe_ffn
    score = v["moe_router_score_function"]
    if score == "softmax" and not v["moe_router_pre_softmax"]:
        raise ValueError(
            "--moe-router-score-function softmax needs --moe-router-pre-softmax (DeepSeek-V2 takes the softmax "
            "over all experts before top-k); softmax over the chosen top-k only is not implemented"
        )
    groups, group_topk = v["moe_router_num_groups"], v["moe_router_group_topk"]
    if (groups is None) != (group_topk is None):
        raise ValueError("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
    if v["moe_router_enable_expert_bias"] and score != "sigmoid":
        raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (DeepSeek-V3 routing)")
    if v["moe_pad_expert_input_to_capacity"] and v["moe_expert_capacity_factor"] is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    balance, coeff = v["moe_router_load_balancing_type"], v["moe_aux_loss_coeff"]
    if balance != "none" and coeff == 0:
        notes.append(f"--moe-router-load-balancing-type {balance} with --moe-aux-loss-coeff 0: the auxiliary loss has no effect")
    if balance == "none" and coeff:
        notes.append(f"--moe-aux-loss-coeff {coeff} is ignored with --moe-router-load-balancing-type none")
    scaling = v["moe_router_topk_scaling_factor"]
    return MoEConfig(
        num_experts=v["num_experts"],
        topk=v["moe_router_topk"],
        ffn_hidden_size=moe_ffn,
        num_shared_experts=n_shared,
        score_function=score,
        num_groups=groups if groups is not None else 1,
        group_topk=group_topk if group_topk is not None else 1,
        # Megatron normalises sigmoid top-k weights; pre-softmax (V2) weights are not normalised.
        norm_topk_prob=score == "sigmoid",
        routed_scaling_factor=1.0 if scaling is None else scaling,
        enable_expert_bias=v["moe_router_enable_expert_bias"],
        bias_update_rate=v["moe_router_bias_update_rate"],
        load_balancing_type=balance,
        aux_loss_coeff=coeff,
        z_loss_coeff=v["moe_z_loss_coeff"],
        capacity_factor=v["moe_expert_capacity_factor"],
        pad_to_capacity=v["moe_pad_expert_input_to_capacity"],
        drop_policy=v["moe_token_drop_policy"],
    )


def _rope_config(v: Mapping[str, Any], preset: Optional[DeepSeekConfig]) -> RopeConfig:
    factor, rope_type = v["rotary_scaling_factor"], v["rope_type"]
    if rope_type is None:
        rope_type = "yarn" if factor != 1.0 else "rope"
    if rope_type == "rope" and factor != 1.0:
        raise ValueError(f"--rotary-scaling-factor {factor} needs --rope-type yarn")
    original = v["original_max_position_embeddings"]
    interleave = v["rotary_interleaved"]
    return RopeConfig(
        theta=float(v["rotary_base"]),
        # DeepSeek checkpoints rotate interleaved pairs; --no-rotary-interleaved picks rotate_half.
        interleave=True if interleave is None else interleave,
        interleave_output_permuted=preset.rope.interleave_output_permuted if preset else True,
        scaling_type="yarn" if rope_type == "yarn" else None,
        factor=factor,
        original_max_position_embeddings=YARN_DEFAULT_ORIGINAL_POSITIONS if original is None else original,
        beta_fast=v["beta_fast"],
        beta_slow=v["beta_slow"],
        mscale=v["mscale"],
        mscale_all_dim=v["mscale_all_dim"],
    )


def model_config_from_flags(
    v: Mapping[str, Any], explicit: Set[str], preset: Optional[DeepSeekConfig], vocab_size: int, notes: List[str]
) -> DeepSeekConfig:
    """The DeepSeekConfig the flags describe; every error names the flag(s) to change."""
    _reject_contradictions(v, explicit)
    _required(v, "num_layers", "hidden_size", "num_attention_heads", "num_experts")
    hidden = v["hidden_size"]
    # Megatron's default dense width for SwiGLU: 2/3 of 4h, rounded down to a multiple of 64.
    ffn = v["ffn_hidden_size"] if v["ffn_hidden_size"] is not None else int((4 * hidden * 2 / 3) / 64) * 64
    first_k, every = dense_moe_split(v["moe_layer_freq"], v["num_layers"])
    max_positions = v["max_position_embeddings"] if v["max_position_embeddings"] is not None else v["seq_length"]
    kernels = KernelConfig(
        use_fused_sdpa=v["use_fused_sdpa"],
        use_fast_softmax=v["use_fast_softmax"],
        use_fused_sdpa_with_recompute=v["use_fused_sdpa_with_recompute"],
        use_fused_rmsnorm=v["use_fused_rmsnorm"],
        use_grouped_gemm=v["moe_grouped_gemm"],
    )
    base_mla = preset.mla if preset else MLAConfig()
    try:
        mla = MLAConfig(
            num_heads=v["num_attention_heads"],
            q_lora_rank=v["q_lora_rank"],
            kv_lora_rank=v["kv_lora_rank"],
            qk_nope_head_dim=v["qk_head_dim"],
            qk_rope_head_dim=v["qk_pos_emb_head_dim"],
            v_head_dim=v["v_head_dim"],
            attention_bias=False,
            lora_norm_eps=base_mla.lora_norm_eps,
        )
        return DeepSeekConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_layers=v["num_layers"],
            first_k_dense=first_k,
            moe_layer_freq=every,
            norm_eps=v["norm_epsilon"],
            max_position_embeddings=max_positions,
            init_method_std=v["init_method_std"],
            tie_word_embeddings=not v["untie_embeddings_and_output_weights"],
            params_dtype="bfloat16" if v["bf16"] else "float32",
            mla=mla,
            moe=_moe_config(v, ffn, notes),
            rope=_rope_config(v, preset),
            mtp=MTPConfig(num_layers=v["mtp_num_layers"] or 0, loss_scaling_factor=v["mtp_loss_scaling_factor"]),
            kernels=kernels,
        )
    except ValueError as e:
        raise ValueError(_with_flags(str(e))) from None


def flags_from_model_config(c: DeepSeekConfig) -> Dict[str, Any]:
    """The model flag values (parser dests) that `model_config_from_flags` maps back to `c`.

    Kernels and params dtype are run choices, not part of a preset, so they are left out.
    """
    theta = c.rope.theta
    shared = c.moe.num_shared_experts * c.moe.ffn_hidden_size
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.mla.num_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "norm_epsilon": c.norm_eps,
        "init_method_std": c.init_method_std,
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings,
        "q_lora_rank": c.mla.q_lora_rank,
        "kv_lora_rank": c.mla.kv_lora_rank,
        "qk_head_dim": c.mla.qk_nope_head_dim,
        "qk_pos_emb_head_dim": c.mla.qk_rope_head_dim,
        "v_head_dim": c.mla.v_head_dim,
        "rotary_base": int(theta) if float(theta).is_integer() else theta,
        "rope_type": "yarn" if c.rope.scaling_type == "yarn" else None,
        "rotary_scaling_factor": c.rope.factor,
        "mscale": c.rope.mscale,
        "mscale_all_dim": c.rope.mscale_all_dim,
        "beta_fast": c.rope.beta_fast,
        "beta_slow": c.rope.beta_slow,
        "original_max_position_embeddings": c.rope.original_max_position_embeddings,
        "rotary_interleaved": c.rope.interleave,
        "num_experts": c.moe.num_experts,
        "moe_router_topk": c.moe.topk,
        "moe_ffn_hidden_size": c.moe.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": shared or None,
        "moe_layer_freq": LayerSplit(c.first_k_dense, c.moe_layer_freq),
        "moe_router_load_balancing_type": c.moe.load_balancing_type,
        "moe_aux_loss_coeff": c.moe.aux_loss_coeff,
        "moe_z_loss_coeff": c.moe.z_loss_coeff,
        "moe_router_score_function": c.moe.score_function,
        "moe_router_topk_scaling_factor": c.moe.routed_scaling_factor,
        "moe_router_num_groups": c.moe.num_groups,
        "moe_router_group_topk": c.moe.group_topk,
        "moe_router_enable_expert_bias": c.moe.enable_expert_bias,
        "moe_router_bias_update_rate": c.moe.bias_update_rate,
        "moe_router_pre_softmax": c.moe.score_function == "softmax",
        "moe_expert_capacity_factor": c.moe.capacity_factor,
        "moe_pad_expert_input_to_capacity": c.moe.pad_to_capacity,
        "moe_token_drop_policy": c.moe.drop_policy,
        "mtp_num_layers": c.mtp.num_layers,
        "mtp_loss_scaling_factor": c.mtp.loss_scaling_factor,
    }


# Fields a checkpoint's weights pin down (taken from the checkpoint under --use-checkpoint-args);
# the rest of the model config are training choices that the command line keeps.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "first_k_dense", "moe_layer_freq",
                "norm_eps", "max_position_embeddings", "tie_word_embeddings", "mla", "rope")
MOE_SHAPE_FIELDS = ("num_experts", "topk", "ffn_hidden_size", "num_shared_experts", "score_function", "num_groups",
                    "group_topk", "norm_topk_prob", "routed_scaling_factor", "enable_expert_bias")
