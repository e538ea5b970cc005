"""Shared helpers of the MoE tests: tiny configs and weight copies to HF's DeepSeek MoE modules."""

from __future__ import annotations

from typing import Any

import torch

from megatron.core.config import DeepSeekConfig, KernelConfig, MoEConfig
from megatron.core.models.deepseek.init import initialize_parameters
from megatron.core.transformer.parallel_context import SINGLE_DEVICE, ParallelContext

HIDDEN = 32
FFN = 16  # per routed expert; 16 fp32 = 64 bytes keeps grouped_mm's 16-byte stride rule


def initialized(module: torch.nn.Module, seed: int = 0, std: float = 0.02, parallel: ParallelContext = SINGLE_DEVICE):
    """`module` with the project's initialisation (modules are built with their weights unset)."""
    initialize_parameters(module, seed, std, parallel)
    return module


def tiny_config(use_grouped_gemm: bool = True, hidden: int = HIDDEN, **moe_kwargs: Any) -> DeepSeekConfig:
    moe_defaults = dict(num_experts=8, topk=2, ffn_hidden_size=FFN, num_shared_experts=1)
    moe_defaults.update(moe_kwargs)
    return DeepSeekConfig(
        vocab_size=64,
        hidden_size=hidden,
        ffn_hidden_size=64,
        num_layers=1,
        first_k_dense=0,
        moe=MoEConfig(**moe_defaults),
        kernels=KernelConfig(use_grouped_gemm=use_grouped_gemm),
    )


def hf_v3_moe(cfg: DeepSeekConfig):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    moe = cfg.moe
    hf_cfg = DeepseekV3Config(
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=moe.ffn_hidden_size,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.topk,
        n_group=moe.num_groups,
        topk_group=moe.group_topk,
        n_shared_experts=moe.num_shared_experts,
        routed_scaling_factor=moe.routed_scaling_factor,
        norm_topk_prob=moe.norm_topk_prob,
    )
    hf_cfg._experts_implementation = "eager"  # HF's own per-expert loop: the plainest reference
    return DeepseekV3MoE(hf_cfg)


def hf_v2_moe(cfg: DeepSeekConfig):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    moe = cfg.moe
    hf_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=moe.ffn_hidden_size,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.topk,
        topk_method="group_limited_greedy" if moe.num_groups > 1 else "greedy",
        n_group=moe.num_groups,
        topk_group=moe.group_topk,
        n_shared_experts=moe.num_shared_experts,
        routed_scaling_factor=moe.routed_scaling_factor,
    )
    hf_cfg._experts_implementation = "eager"
    return DeepseekV2Moe(hf_cfg)


@torch.no_grad()
def copy_to_hf(layer: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Our MoELayer's weights -> HF's DeepseekV3MoE / DeepseekV2Moe (same in-memory expert layout)."""
    hf.gate.weight.copy_(layer.router.weight)
    if layer.router.expert_bias is not None:
        hf.gate.e_score_correction_bias.copy_(layer.router.expert_bias)
    hf.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
    hf.experts.down_proj.copy_(layer.experts.down_proj)
    shared = layer.shared_experts
    width = shared.ffn_hidden_size
    hf.shared_experts.gate_proj.weight.copy_(shared.gate_up_proj.weight[:width])
    hf.shared_experts.up_proj.weight.copy_(shared.gate_up_proj.weight[width:])
    hf.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)


def hf_grads_in_our_layout(hf: torch.nn.Module) -> dict:
    return {
        "router.weight": hf.gate.weight.grad,
        "experts.gate_up_proj": hf.experts.gate_up_proj.grad,
        "experts.down_proj": hf.experts.down_proj.grad,
        "shared_experts.gate_up_proj.weight": torch.cat(
            [hf.shared_experts.gate_proj.weight.grad, hf.shared_experts.up_proj.weight.grad]
        ),
        "shared_experts.down_proj.weight": hf.shared_experts.down_proj.weight.grad,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()
