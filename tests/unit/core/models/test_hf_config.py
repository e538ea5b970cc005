"""HF config mapping (both directions) and the named presets."""

import dataclasses
import json

import pytest
from transformers import DeepseekV2Config, DeepseekV3Config

from megatron.core.config import DeepSeekConfig, KernelConfig, MoEConfig, RopeConfig
from megatron.core.models.deepseek.hf_config import config_from_hf, config_to_hf_dict
from megatron.core.models.deepseek.presets import PRESETS, get_preset

V3_YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
}
# Training-recipe fields that HF configs do not carry: the preset follows the V3 paper here.
NOT_IN_HF = {"moe.load_balancing_type", "moe.aux_loss_coeff"}


def _flat(config: DeepSeekConfig) -> dict:
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def test_presets_validate_and_lookup():
    assert set(PRESETS) == {"deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny"}
    for config in PRESETS.values():  # validated when built; rebuilding re-validates
        assert dataclasses.replace(config) == config
    assert get_preset("tiny") is PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("deepseek-v4")


def test_v3_preset_equals_hf_defaults_plus_yarn():
    hf = DeepseekV3Config(max_position_embeddings=163840, rope_parameters=dict(V3_YARN))
    mapped, preset = _flat(config_from_hf(hf)), _flat(get_preset("deepseek-v3"))
    assert mapped.keys() == preset.keys()
    differing = {k for k in preset if mapped[k] != preset[k]}
    assert differing == NOT_IN_HF, {k: (mapped[k], preset[k]) for k in differing}
    assert mapped["moe.load_balancing_type"] == "none"  # HF computes no auxiliary loss


def test_v3_original_config_json_spelling(tmp_path):
    # DeepSeek's released file: rope_scaling + rope_theta, plus its own MoE keys.
    raw = DeepseekV3Config().to_dict()
    raw.pop("rope_parameters")
    raw.update(
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True, moe_layer_freq=1,
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = config_from_hf(tmp_path)
    assert config.rope == get_preset("deepseek-v3").rope
    assert (config.moe.load_balancing_type, config.moe.aux_loss_coeff) == ("seq_aux_loss", 0.001)
    assert config_from_hf(tmp_path / "config.json") == config


def test_v2_lite_mapping():
    hf = DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    mapped, preset = _flat(config_from_hf(hf)), _flat(get_preset("deepseek-v2-lite"))
    differing = {k for k in preset if mapped[k] != preset[k]}
    assert differing == NOT_IN_HF
    config = config_from_hf(hf)
    assert config.rope.interleave and not config.rope.interleave_output_permuted
    assert config.moe.score_function == "softmax" and not config.moe.enable_expert_bias
    assert config.mtp.num_layers == 0 and config.mla.q_lora_rank is None


def test_v2_group_limited_greedy_and_errors():
    base = dict(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    config = config_from_hf(DeepseekV2Config(**base))
    assert (config.moe.num_groups, config.moe.group_topk) == (4, 2)
    greedy = config_from_hf(DeepseekV2Config(**{**base, "topk_method": "greedy"}))
    assert (greedy.moe.num_groups, greedy.moe.group_topk) == (1, 1)
    d = DeepseekV2Config(**base).to_dict()
    for bad in (
        {"num_experts_per_tok": None},
        {"topk_method": "noaux_tc"},
        {"n_group": None},
        {"scoring_func": "sigmoid"},
        {"model_type": "llama"},
        {"hidden_act": "gelu"},
        {"moe_layer_freq": 2},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ):
        with pytest.raises(ValueError):
            config_from_hf({**d, **bad})


def test_yarn_factor_defaults_to_length_ratio_and_overrides():
    d = DeepseekV3Config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2).to_dict()
    d.update(max_position_embeddings=8192,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 2048})
    config = config_from_hf(d, kernels=KernelConfig(use_fused_sdpa=False))
    assert config.rope.factor == 4.0 and config.rope.mscale_all_dim == 0.0
    assert config.kernels.use_fused_sdpa is False


def _variants():
    tiny = get_preset("tiny")
    yield "deepseek_v3", tiny
    yield "deepseek_v3", get_preset("deepseek-v3")
    yield "deepseek_v3", dataclasses.replace(
        tiny, tie_word_embeddings=True, rope=RopeConfig(theta=5000.0, interleave=False),
        moe=dataclasses.replace(tiny.moe, load_balancing_type="none", aux_loss_coeff=0.0, routed_scaling_factor=1.0),
    )
    yield "deepseek_v2", get_preset("deepseek-v2")
    yield "deepseek_v2", get_preset("deepseek-v2-lite")
    yield "deepseek_v2", dataclasses.replace(
        tiny, mtp=dataclasses.replace(tiny.mtp, num_layers=0), rope=RopeConfig(interleave_output_permuted=False),
        moe=MoEConfig(num_experts=8, topk=2, ffn_hidden_size=128, score_function="softmax", num_groups=4,
                      group_topk=2, norm_topk_prob=False, load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01),
    )


@pytest.mark.parametrize("model_type, config", list(_variants()))
def test_export_round_trips_through_transformers(model_type, config, tmp_path):
    d = config_to_hf_dict(config, model_type)
    assert d["model_type"] == model_type
    json.dumps(d)  # writable as config.json
    hf_cls = DeepseekV3Config if model_type == "deepseek_v3" else DeepseekV2Config
    hf = hf_cls(**{k: v for k, v in d.items() if k != "model_type"})
    hf.save_pretrained(tmp_path)
    assert config_from_hf(hf) == config
    assert config_from_hf(tmp_path) == config
    assert config_from_hf(d) == config


def test_export_rejects_inexpressible_configs():
    tiny = get_preset("tiny")
    with pytest.raises(ValueError):
        config_to_hf_dict(tiny, "deepseek_v2")  # sigmoid router
    with pytest.raises(ValueError):
        config_to_hf_dict(get_preset("deepseek-v2"), "deepseek_v3")  # softmax router
    with pytest.raises(ValueError):
        config_to_hf_dict(dataclasses.replace(tiny, moe_layer_freq=2), "deepseek_v3")
    with pytest.raises(ValueError):
        config_to_hf_dict(tiny, "llama")
