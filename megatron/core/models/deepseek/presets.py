"""Named model configurations: the released DeepSeek models' sizes and a tiny debug model.

Sizes follow DeepSeek's published config.json files; load-balancing settings follow the papers
(V3: aux-loss-free expert bias, update rate 1e-3, plus a sequence-wise loss with alpha 1e-4;
V2: expert-level auxiliary loss, alpha 0.003, V2-Lite 0.001). The released V2/V3 models extend
the context with YaRN (factor 40 over 4096 original positions, 163840 maximum).
init_method_std is the config files' initializer_range (0.02); the V2/V3 papers pretrain with
0.006, so pass that (--init-method-std) when training from scratch at full size.
Use `dataclasses.replace` to change fields (e.g. vocab_size from a tokenizer).
"""

from __future__ import annotations

from typing import Dict

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig, RopeConfig

_YARN_V3 = RopeConfig(
    theta=10000.0,
    interleave=True,
    interleave_output_permuted=True,
    scaling_type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)

# V2 keeps the rotated pairs interleaved (complex rotation) and uses mscale 0.707.
_YARN_V2 = RopeConfig(
    theta=10000.0,
    interleave=True,
    interleave_output_permuted=False,
    scaling_type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=0.707,
    mscale_all_dim=0.707,
)

_MLA_FULL = MLAConfig(
    num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)

DEEPSEEK_V3 = DeepSeekConfig(
    vocab_size=129280,
    hidden_size=7168,
    ffn_hidden_size=18432,
    num_layers=61,
    first_k_dense=3,
    norm_eps=1e-6,
    max_position_embeddings=163840,
    init_method_std=0.02,
    mla=_MLA_FULL,
    moe=MoEConfig(
        num_experts=256,
        topk=8,
        ffn_hidden_size=2048,
        num_shared_experts=1,
        score_function="sigmoid",
        num_groups=8,
        group_topk=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        enable_expert_bias=True,
        bias_update_rate=1e-3,
        load_balancing_type="seq_aux_loss",
        aux_loss_coeff=1e-4,
    ),
    rope=_YARN_V3,
    mtp=MTPConfig(num_layers=1, loss_scaling_factor=0.1),
)

DEEPSEEK_V2 = DeepSeekConfig(
    vocab_size=102400,
    hidden_size=5120,
    ffn_hidden_size=12288,
    num_layers=60,
    first_k_dense=1,
    norm_eps=1e-6,
    max_position_embeddings=163840,
    init_method_std=0.02,
    mla=_MLA_FULL,
    moe=MoEConfig(
        num_experts=160,
        topk=6,
        ffn_hidden_size=1536,
        num_shared_experts=2,
        score_function="softmax",
        num_groups=8,
        group_topk=3,
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        load_balancing_type="aux_loss",
        aux_loss_coeff=0.003,
    ),
    rope=_YARN_V2,
)

DEEPSEEK_V2_LITE = DeepSeekConfig(
    vocab_size=102400,
    hidden_size=2048,
    ffn_hidden_size=10944,
    num_layers=27,
    first_k_dense=1,
    norm_eps=1e-6,
    max_position_embeddings=163840,
    init_method_std=0.02,
    mla=MLAConfig(
        num_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
    ),
    moe=MoEConfig(
        num_experts=64,
        topk=6,
        ffn_hidden_size=1408,
        num_shared_experts=2,
        score_function="softmax",
        num_groups=1,
        group_topk=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        load_balancing_type="aux_loss",
        aux_loss_coeff=0.001,
    ),
    rope=_YARN_V2,
)

# A V3-shaped debug model (sigmoid group routing, expert bias, MTP) that trains fast on CPU.
TINY = DeepSeekConfig(
    vocab_size=1024,
    hidden_size=256,
    ffn_hidden_size=512,
    num_layers=4,
    first_k_dense=1,
    norm_eps=1e-6,
    max_position_embeddings=4096,
    init_method_std=0.02,
    mla=MLAConfig(num_heads=8, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    moe=MoEConfig(
        num_experts=8,
        topk=2,
        ffn_hidden_size=128,
        num_shared_experts=1,
        score_function="sigmoid",
        num_groups=2,
        group_topk=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        enable_expert_bias=True,
        bias_update_rate=1e-3,
        load_balancing_type="seq_aux_loss",
        aux_loss_coeff=1e-4,
    ),
    rope=RopeConfig(theta=10000.0, interleave=True, interleave_output_permuted=True),
    mtp=MTPConfig(num_layers=1, loss_scaling_factor=0.1),
)

PRESETS: Dict[str, DeepSeekConfig] = {
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-v2": DEEPSEEK_V2,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "tiny": TINY,
}


# Short names of the released models (the launcher's HL_MODEL values use them too).
PRESET_ALIASES: Dict[str, str] = {
    "v3-671b": "deepseek-v3",
    "v2-236b": "deepseek-v2",
    "v2-lite": "deepseek-v2-lite",
}


def preset_names() -> tuple:
    """Every accepted preset name: the presets' own names and their short aliases."""
    return tuple(sorted(PRESETS)) + tuple(PRESET_ALIASES)


def get_preset(name: str) -> DeepSeekConfig:
    """The preset called `name` or its alias (configs are frozen, so the shared instance is safe to return)."""
    try:
        return PRESETS[PRESET_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {list(preset_names())}") from None
