"""A tiny DeepSeek-V3 config and deterministic token batches for single-process model tests."""

from __future__ import annotations

from typing import Dict

import torch

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig
from megatron.core.models.deepseek.model import DeepSeekModel

GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 64


def tiny_config(moe: bool = True) -> DeepSeekConfig:
    """4 layers (1 dense, 3 MoE: 8 experts in 4 groups, top-2 of the best 2 groups) + 1 MTP depth;
    or 4 dense layers without MTP."""
    return DeepSeekConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_hidden_size=48,
        num_layers=4,
        first_k_dense=1 if moe else 4,
        max_position_embeddings=64,
        mla=MLAConfig(num_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        moe=MoEConfig(
            num_experts=8,
            topk=2,
            ffn_hidden_size=16,
            num_shared_experts=1,
            num_groups=4,
            group_topk=2,
            routed_scaling_factor=2.0,
            enable_expert_bias=True,
            bias_update_rate=1e-2,
            load_balancing_type="seq_aux_loss",
            aux_loss_coeff=0.01,
        ),
        mtp=MTPConfig(num_layers=1 if moe else 0, loss_scaling_factor=0.3),
    )


def batch(step: int) -> torch.Tensor:
    """Global batch of step `step`: [GLOBAL_BATCH, SEQ + 1] token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def initial_state(config: DeepSeekConfig, seed: int = 1234) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in DeepSeekModel(config, seed=seed).state_dict().items()}
