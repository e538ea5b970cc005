"""Tiny random HF DeepSeek models for conversion and parity tests (built offline from configs).

Three architectures, as the issue asks: V3 (q LoRA, YaRN, group-limited sigmoid routing with a
NONZERO expert bias), V2-Lite style (no q LoRA, greedy softmax, 2 shared experts, first_k 1) and V2
with group-limited greedy routing. Sizes are small enough for 2 CPU cores but keep every dimension
distinct so a transposed or mis-split tensor cannot go unnoticed.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
)


def v3_config(**overrides) -> DeepseekV3Config:
    kw = dict(
        _COMMON,
        q_lora_rank=40,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_nextn_predict_layers=0,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        },
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def v2_lite_config(**overrides) -> DeepseekV2Config:
    kw = dict(_COMMON, q_lora_rank=None, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0)
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def v2_group_config(**overrides) -> DeepseekV2Config:
    kw = dict(
        _COMMON, q_lora_rank=40, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, num_experts_per_tok=3,  # topk > topk_group, else group-limited = greedy
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        },
    )
    kw.update(overrides)
    return DeepseekV2Config(**kw)


CONFIGS: Dict[str, Callable] = {"v3": v3_config, "v2_lite": v2_lite_config, "v2_group": v2_group_config}


def build_hf(name: str, seed: int = 0, attn: str = "eager", **overrides) -> torch.nn.Module:
    """Random HF model in fp32 eval mode; V3 expert biases set to nonzero random values."""
    config = CONFIGS[name](**overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    cls = DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    model = cls(config).float().eval()
    with torch.no_grad():
        for module_name, buf in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    return model
