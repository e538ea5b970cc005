"""Megatron model flags <-> DeepSeekConfig (the model section of a run).

Fields of the core config dataclasses name their flag in their metadata (`flag_field`). A "plain"
field takes the flag's value as it is, so `model_config_from_flags` and `flags_from_model_config`
map every plain field without per-field code: a new plain model flag needs only its parser entry
and its dataclass field. Derived fields (a different unit, a default computed from another flag,
one flag feeding two fields) are resolved below, each in one place. Flag-level checks that no
config field can express (a flag combination the model does not implement) are made here too;
everything about the values themselves is validated by the dataclasses when they are built, with
messages that already name the flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple, Union

from megatron.core.config import DeepSeekConfig, KernelConfig, MLAConfig, MoEConfig, MTPConfig, RopeConfig

YARN_DEFAULT_ORIGINAL_POSITIONS = 4096  # Megatron's MLATransformerConfig default

# Fields a checkpoint's weights pin down (taken from the checkpoint under --use-checkpoint-args);
# the rest of the model config are training choices that the command line keeps.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "first_k_dense", "moe_layer_freq",
                "norm_eps", "max_position_embeddings", "tie_word_embeddings", "mla", "rope")
MOE_SHAPE_FIELDS = ("num_experts", "topk", "ffn_hidden_size", "num_shared_experts", "score_function", "num_groups",
                    "group_topk", "norm_topk_prob", "routed_scaling_factor", "enable_expert_bias")


def flag_dest(flag: str) -> str:
    """argparse destination of a flag: "--moe-router-topk" -> "moe_router_topk"."""
    return flag.lstrip("-").replace("-", "_")


def _plain_fields(cls: type) -> List[Tuple[str, str]]:
    """(field name, parser dest) of the fields of `cls` that take their flag's value unchanged."""
    return [(f.name, flag_dest(f.metadata["flag"])) for f in dataclasses.fields(cls)
            if "flag" in f.metadata and not f.metadata.get("derived")]


def _plain_values(cls: type, v: Mapping[str, Any]) -> Dict[str, Any]:
    return {name: v[dest] for name, dest in _plain_fields(cls)}


class LayerSplit(NamedTuple):
    """A preset's dense/MoE layout (first_k_dense, moe_layer_freq) carried through the flag dict;
    unlike a 0/1 list it stays valid when --num-layers is overridden."""

    first_k_dense: int
    every: int


def dense_moe_split(freq: Union[int, List[int], LayerSplit], num_layers: int) -> Tuple[int, int]:
    """--moe-layer-freq -> (first_k_dense, moe_layer_freq).

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
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_experts"):
        if v[name] is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (or use --model-preset)")


def _moe_config(v: Mapping[str, Any], ffn: int, notes: List[str]) -> MoEConfig:
    moe_ffn = v["moe_ffn_hidden_size"] if v["moe_ffn_hidden_size"] is not None else ffn
    shared = v["moe_shared_expert_intermediate_size"]
    if shared and (moe_ffn <= 0 or shared % moe_ffn):
        raise ValueError(
            f"--moe-shared-expert-intermediate-size ({shared}) must be a multiple of --moe-ffn-hidden-size "
            f"({moe_ffn}): the shared experts are whole experts"
        )
    score = v["moe_router_score_function"]
    if score == "softmax" and not v["moe_router_pre_softmax"]:
        raise ValueError(
            "--moe-router-score-function softmax needs --moe-router-pre-softmax (DeepSeek-V2 takes the softmax "
            "over all experts before top-k); softmax over the chosen top-k only is not implemented"
        )
    groups, group_topk = v["moe_router_num_groups"], v["moe_router_group_topk"]
    if (groups is None) != (group_topk is None):
        raise ValueError("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
    balance, coeff = v["moe_router_load_balancing_type"], v["moe_aux_loss_coeff"]
    if balance != "none" and coeff == 0:
        notes.append(f"--moe-router-load-balancing-type {balance} with --moe-aux-loss-coeff 0: the auxiliary loss has no effect")
    if balance == "none" and coeff:
        notes.append(f"--moe-aux-loss-coeff {coeff} is ignored with --moe-router-load-balancing-type none")
    scaling = v["moe_router_topk_scaling_factor"]
    return MoEConfig(
        **_plain_values(MoEConfig, v),
        ffn_hidden_size=moe_ffn,
        num_shared_experts=shared // moe_ffn if shared else 0,
        num_groups=groups if groups is not None else 1,
        group_topk=group_topk if group_topk is not None else 1,
        # Megatron normalises sigmoid top-k weights; pre-softmax (V2) weights are not normalised.
        norm_topk_prob=score == "sigmoid",
        routed_scaling_factor=1.0 if scaling is None else scaling,
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
        **_plain_values(RopeConfig, v),
        theta=float(v["rotary_base"]),
        # DeepSeek checkpoints rotate interleaved pairs; --no-rotary-interleaved picks rotate_half.
        interleave=True if interleave is None else interleave,
        interleave_output_permuted=preset.rope.interleave_output_permuted if preset else True,
        scaling_type="yarn" if rope_type == "yarn" else None,
        original_max_position_embeddings=YARN_DEFAULT_ORIGINAL_POSITIONS if original is None else original,
    )


def model_config_from_flags(
    v: Mapping[str, Any], explicit: Set[str], preset: Optional[DeepSeekConfig], vocab_size: int, notes: List[str]
) -> DeepSeekConfig:
    """The DeepSeekConfig the flags (already merged with a preset) describe; `vocab_size` is the
    tokenizer's vocabulary (provisional until the tokenizer is built)."""
    _reject_contradictions(v, explicit)
    hidden = v["hidden_size"]
    # Megatron's default dense width for SwiGLU: 2/3 of 4h, rounded down to a multiple of 64.
    ffn = v["ffn_hidden_size"] if v["ffn_hidden_size"] is not None else int((4 * hidden * 2 / 3) / 64) * 64
    first_k, every = dense_moe_split(v["moe_layer_freq"], v["num_layers"])
    max_positions = v["max_position_embeddings"] if v["max_position_embeddings"] is not None else v["seq_length"]
    base_mla = preset.mla if preset else MLAConfig()
    return DeepSeekConfig(
        **_plain_values(DeepSeekConfig, v),
        vocab_size=vocab_size,
        ffn_hidden_size=ffn,
        first_k_dense=first_k,
        moe_layer_freq=every,
        max_position_embeddings=max_positions,
        tie_word_embeddings=not v["untie_embeddings_and_output_weights"],
        params_dtype="bfloat16" if v["bf16"] else "float32",
        mla=MLAConfig(**_plain_values(MLAConfig, v), attention_bias=False, lora_norm_eps=base_mla.lora_norm_eps),
        moe=_moe_config(v, ffn, notes),
        rope=_rope_config(v, preset),
        mtp=MTPConfig(**_plain_values(MTPConfig, v), num_layers=v["mtp_num_layers"] or 0),
        kernels=KernelConfig(**_plain_values(KernelConfig, v), use_fused_rope=v["apply_rope_fusion"]),
    )


def flags_from_model_config(c: DeepSeekConfig) -> Dict[str, Any]:
    """The model flag values (parser dests) that `model_config_from_flags` maps back to `c`.

    Kernels, params dtype and vocabulary padding are run choices, not part of a preset, so they
    are left out.
    """
    out: Dict[str, Any] = {}
    for cls, obj in ((DeepSeekConfig, c), (MLAConfig, c.mla), (MoEConfig, c.moe), (RopeConfig, c.rope), (MTPConfig, c.mtp)):
        for name, dest in _plain_fields(cls):
            out[dest] = getattr(obj, name)
    out.pop("make_vocab_size_divisible_by")
    theta = c.rope.theta
    out.update(
        ffn_hidden_size=c.ffn_hidden_size,
        max_position_embeddings=c.max_position_embeddings,
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rope_type="yarn" if c.rope.scaling_type == "yarn" else None,
        original_max_position_embeddings=c.rope.original_max_position_embeddings,
        rotary_interleaved=c.rope.interleave,
        moe_ffn_hidden_size=c.moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=c.moe.num_shared_experts * c.moe.ffn_hidden_size or None,
        moe_layer_freq=LayerSplit(c.first_k_dense, c.moe_layer_freq),
        moe_router_topk_scaling_factor=c.moe.routed_scaling_factor,
        moe_router_num_groups=c.moe.num_groups,
        moe_router_group_topk=c.moe.group_topk,
        moe_router_pre_softmax=c.moe.score_function == "softmax",
        mtp_num_layers=c.mtp.num_layers,
    )
    return out


def shape_flag_dests() -> Dict[str, str]:
    """{"model.<field>" / "model.moe.<field>": parser dest} of the fields a checkpoint pins down,
    to tell which of them the user gave explicitly."""
    out: Dict[str, str] = {}
    for cls, prefix, names in ((DeepSeekConfig, "model.", SHAPE_FIELDS), (MoEConfig, "model.moe.", MOE_SHAPE_FIELDS),
                               (MLAConfig, "model.mla.", None), (RopeConfig, "model.rope.", None)):
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata and (names is None or f.name in names):
                out[prefix + f.name] = flag_dest(f.metadata["flag"])
    return out
