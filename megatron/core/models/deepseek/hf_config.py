"""Mapping between Hugging Face DeepSeek `config.json` fields and our DeepSeekConfig.

`config_from_hf` reads DeepSeek-V3 (`model_type` "deepseek_v3") and DeepSeek-V2 / V2-Lite
("deepseek_v2") configs: a dict, a transformers config object, or a path to config.json (or its
directory). Both RoPE spellings are accepted: transformers 5's `rope_parameters` and the older
`rope_scaling` + `rope_theta` of DeepSeek's released files. `config_to_hf_dict` is the inverse,
what an export writes as config.json; it loads with transformers' DeepseekV3Config /
DeepseekV2Config and maps back to the same DeepSeekConfig.

Architecture facts follow transformers' DeepseekV3/V2 modelling code: V3 routes with sigmoid scores, an
expert bias and group-limited top-k; V2 with softmax, "greedy" or "group_limited_greedy"; a layer
is MoE exactly when its index >= first_k_dense_replace. Training-only settings (capacity, kernels,
params dtype) are not in HF configs and keep DeepSeekConfig's defaults; DeepSeek's own
`aux_loss_alpha` / `seq_aux` are read when present.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Union

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig, RopeConfig
from megatron.core.transformer.rope import rope_attention_factor

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")

HFConfigLike = Union[Mapping[str, Any], str, os.PathLike, Any]


def _as_dict(hf_config: HFConfigLike) -> Dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ValueError(f"expected a dict, a transformers config or a config.json path, got {type(hf_config).__name__}")


def _get(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """d[key], or `default` when the key is missing or null."""
    value = d.get(key)
    return default if value is None else value


def _rope_from_hf(d: Mapping[str, Any], model_type: str, max_positions: int) -> RopeConfig:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope parameters are not used by DeepSeek models")
    theta = float(_get(params, "rope_theta", _get(d, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if model_type == "deepseek_v3":
        interleave, permuted = bool(_get(d, "rope_interleave", True)), True
    else:
        interleave, permuted = True, False  # V2's complex rotation keeps pairs interleaved
    if rope_type == "default":
        return RopeConfig(theta=theta, interleave=interleave, interleave_output_permuted=permuted)
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope type {rope_type!r}; DeepSeek models use 'default' or 'yarn'")
    if params.get("truncate") is False:
        raise ValueError("YaRN with truncate=False is not supported (DeepSeek floors/ceils the correction range)")
    original = int(_get(params, "original_max_position_embeddings", max_positions))
    factor = float(_get(params, "factor", max_positions / original))
    rope = RopeConfig(
        theta=theta,
        interleave=interleave,
        interleave_output_permuted=permuted,
        scaling_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),  # HF treats 0/None as the default
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(_get(params, "mscale", 1.0)),
        mscale_all_dim=float(_get(params, "mscale_all_dim", 0.0)),
    )
    explicit = params.get("attention_factor")
    if explicit is not None:
        if abs(float(explicit) - rope_attention_factor(rope)) > 1e-9:
            raise ValueError("an explicit YaRN attention_factor differing from the mscale ratio is not supported")
    return rope


def _moe_from_hf(d: Mapping[str, Any], model_type: str) -> MoEConfig:
    num_experts = d.get("n_routed_experts")
    topk = d.get("num_experts_per_tok")
    if not num_experts or not topk:
        raise ValueError("n_routed_experts and num_experts_per_tok must be set (DeepSeek models are MoE)")
    scoring = d.get("scoring_func")
    if model_type == "deepseek_v3":
        if scoring not in (None, "sigmoid"):
            raise ValueError(f"deepseek_v3 routes with sigmoid scores, config says scoring_func={scoring!r}")
        score_function, expert_bias = "sigmoid", True
        num_groups, group_topk = int(_get(d, "n_group", 1)), int(_get(d, "topk_group", 1))
    else:
        if scoring not in (None, "softmax"):
            raise ValueError(f"deepseek_v2 routes with softmax scores, config says scoring_func={scoring!r}")
        score_function, expert_bias = "softmax", False
        method = _get(d, "topk_method", "greedy")
        if method not in _V2_TOPK_METHODS:
            raise ValueError(f"deepseek_v2 topk_method must be one of {_V2_TOPK_METHODS}, got {method!r}")
        if method == "greedy":
            num_groups, group_topk = 1, 1
        else:
            if d.get("n_group") is None or d.get("topk_group") is None:
                raise ValueError("group_limited_greedy routing needs n_group and topk_group")
            num_groups, group_topk = int(d["n_group"]), int(d["topk_group"])
    alpha = float(_get(d, "aux_loss_alpha", 0.0))
    balancing = ("seq_aux_loss" if d.get("seq_aux") else "aux_loss") if alpha > 0 else "none"
    return MoEConfig(
        num_experts=int(num_experts),
        topk=int(topk),
        ffn_hidden_size=int(d["moe_intermediate_size"]),
        num_shared_experts=int(_get(d, "n_shared_experts", 0)),
        score_function=score_function,
        num_groups=num_groups,
        group_topk=group_topk,
        norm_topk_prob=bool(_get(d, "norm_topk_prob", model_type == "deepseek_v3")),
        routed_scaling_factor=float(_get(d, "routed_scaling_factor", 1.0)),
        enable_expert_bias=expert_bias,
        load_balancing_type=balancing,
        aux_loss_coeff=alpha,
    )


def config_from_hf(hf_config: HFConfigLike, **overrides: Any) -> DeepSeekConfig:
    """DeepSeekConfig for an HF DeepSeek-V3 / V2 config. `overrides` replace top-level fields after mapping."""
    d = _as_dict(hf_config)
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if _get(d, "hidden_act", "silu") != "silu":
        raise ValueError(f"DeepSeek MLPs use silu, config says hidden_act={d['hidden_act']!r}")
    heads = int(d["num_attention_heads"])
    # num_key_value_heads is not read: MLA expands the latent into all heads' keys and values
    # (DeepseekV3Config's default 128 is often left unchanged in small test configs).
    if int(_get(d, "moe_layer_freq", 1)) != 1:
        raise ValueError("moe_layer_freq != 1 is not supported (HF makes every layer >= first_k_dense_replace MoE)")
    max_positions = int(_get(d, "max_position_embeddings", 4096))
    mtp_layers = _get(d, "num_nextn_predict_layers", _get(d, "num_mtp_layers", 0)) if model_type == "deepseek_v3" else 0
    q_lora = d.get("q_lora_rank")
    config = DeepSeekConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        ffn_hidden_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        first_k_dense=int(_get(d, "first_k_dense_replace", 0)),
        moe_layer_freq=1,
        norm_eps=float(_get(d, "rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        init_method_std=float(_get(d, "initializer_range", 0.02)),
        tie_word_embeddings=bool(_get(d, "tie_word_embeddings", False)),
        mla=MLAConfig(
            num_heads=heads,
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(d["kv_lora_rank"]),
            qk_nope_head_dim=int(d["qk_nope_head_dim"]),
            qk_rope_head_dim=int(d["qk_rope_head_dim"]),
            v_head_dim=int(d["v_head_dim"]),
            attention_bias=bool(_get(d, "attention_bias", False)),
        ),
        moe=_moe_from_hf(d, model_type),
        rope=_rope_from_hf(d, model_type, max_positions),
        mtp=MTPConfig(num_layers=int(mtp_layers)),
    )
    return dataclasses.replace(config, **overrides) if overrides else config


def _rope_to_hf(rope: RopeConfig) -> Dict[str, Any]:
    if rope.scaling_type is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {
        "rope_type": "yarn",
        "rope_theta": rope.theta,
        "factor": rope.factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings,
        "beta_fast": rope.beta_fast,
        "beta_slow": rope.beta_slow,
        "mscale": rope.mscale,
        "mscale_all_dim": rope.mscale_all_dim,
    }


def _check_exportable(config: DeepSeekConfig, model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if config.moe_layer_freq != 1:
        raise ValueError("HF DeepSeek configs cannot express moe_layer_freq != 1")
    moe = config.moe
    if model_type == "deepseek_v3":
        if moe.score_function != "sigmoid":
            raise ValueError("deepseek_v3 needs the sigmoid score function; export softmax routers as deepseek_v2")
    else:
        if moe.score_function != "softmax":
            raise ValueError("deepseek_v2 needs the softmax score function; export sigmoid routers as deepseek_v3")
        if not config.rope.interleave or config.rope.interleave_output_permuted:
            raise ValueError("deepseek_v2 always applies the interleaved complex rotation (interleave=True, unpermuted)")
        if config.mtp.num_layers:
            raise ValueError("deepseek_v2 has no multi-token prediction layers")


def config_to_hf_dict(config: DeepSeekConfig, model_type: str = "deepseek_v3") -> Dict[str, Any]:
    """The config.json dict of an HF export of `config` (inverse of `config_from_hf`)."""
    _check_exportable(config, model_type)
    mla, moe = config.mla, config.moe
    d: Dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": mla.num_heads,
        "num_key_value_heads": mla.num_heads,
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "attention_bias": mla.attention_bias,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "num_experts_per_tok": moe.topk,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": moe.norm_topk_prob,
        "first_k_dense_replace": config.first_k_dense,
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_method_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": _rope_to_hf(config.rope),
        "scoring_func": moe.score_function,
        "aux_loss_alpha": moe.aux_loss_coeff if moe.load_balancing_type != "none" else 0.0,
        "seq_aux": moe.load_balancing_type == "seq_aux_loss",
    }
    if model_type == "deepseek_v3":
        d.update(
            n_group=moe.num_groups,
            topk_group=moe.group_topk,
            topk_method="noaux_tc",
            rope_interleave=config.rope.interleave,
            num_nextn_predict_layers=config.mtp.num_layers,
        )
    elif moe.num_groups == 1:
        d.update(topk_method="greedy", n_group=None, topk_group=None)
    else:
        d.update(topk_method="group_limited_greedy", n_group=moe.num_groups, topk_group=moe.group_topk)
    return d
