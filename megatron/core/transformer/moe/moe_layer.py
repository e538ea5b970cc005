"""DeepSeekMoE layer: top-k router + token dispatcher + stacked routed experts + shared experts.

out = sum_j w_tj * expert_{e_tj}(x_t) + shared(x_t), the layout of HF's DeepseekV3MoE /
DeepseekV2Moe (the shared experts are one SwiGLU of width ffn_hidden_size * num_shared_experts,
unscaled). Auxiliary losses ride on the routing weights through `attach_aux_loss`, so the
output is exactly the routed sum and backward still sees the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from megatron.core.config import DeepSeekConfig
from megatron.core.transformer.mlp import SwiGLUMLP
from megatron.core.transformer.moe.experts import GroupedExperts
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import TokenDispatcher


@dataclass
class MoEStats:
    """Per-layer statistics of the last forward; tensors stay on the device (read them when logging)."""

    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-dim, coeff included, unscaled
    tokens_per_expert: Optional[torch.Tensor] = None  # [E] int64 routing choices of real tokens, before drop
    dropped_fraction: Optional[torch.Tensor] = None  # 0-dim fp32 share of real assignments dropped


class MoELayer(nn.Module):
    """forward(hidden [B, S, H], token_mask [B, S] bool or None) -> [B, S, H].

    token_mask marks real tokens (True); padding tokens get no routed output, take no expert
    capacity and are left out of the load counts and aux losses (shared experts still apply).
    After each forward `last_stats` holds a `MoEStats`.
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        if not config.is_moe_layer(layer_idx):
            raise ValueError(f"layer {layer_idx} is dense under this config (first_k_dense={config.first_k_dense})")
        moe = config.moe
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.router = TopKRouter(config)
        self.dispatcher = TokenDispatcher.from_config(moe)
        self.experts = GroupedExperts(
            moe.num_experts,
            config.hidden_size,
            moe.ffn_hidden_size,
            use_grouped_gemm=config.kernels.use_grouped_gemm,
            init_method_std=config.init_method_std,
        )
        self.shared_experts: Optional[SwiGLUMLP] = None
        if moe.num_shared_experts > 0:
            self.shared_experts = SwiGLUMLP(config.hidden_size, moe.ffn_hidden_size * moe.num_shared_experts)
        self.last_stats: Optional[MoEStats] = None

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient factor of this layer's aux losses (e.g. 1 / num_micro_batches)."""
        self.router.set_aux_loss_scale(scale)

    def update_expert_bias(self, tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """Apply the aux-loss-free bias update from the load accumulated since the last call."""
        self.router.update_expert_bias(tokens_per_expert)

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE layer expects [batch, seq, {self.hidden_size}], got {tuple(hidden.shape)}")
        shape = hidden.shape
        routing = self.router(hidden, token_mask)
        flat = hidden.reshape(-1, self.hidden_size)
        flat_mask = None if token_mask is None else token_mask.reshape(-1)

        rows, plan = self.dispatcher.dispatch_preprocess(flat, routing.probs, routing.indices, flat_mask)
        rows = self.dispatcher.dispatch(rows, plan)
        if plan.padded:
            num_experts = self.experts.num_local_experts
            expert_out = self.experts.forward_padded(rows.view(num_experts, -1, self.hidden_size))
            expert_out = expert_out.reshape(-1, self.hidden_size)
        else:
            expert_out = self.experts(rows, plan.tokens_per_expert, all_rows_valid=plan.all_rows_valid)
        expert_out = self.dispatcher.combine(expert_out, plan)
        out = self.dispatcher.combine_postprocess(expert_out, plan).to(hidden.dtype)

        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.last_stats = MoEStats(
            aux_losses=routing.aux_losses,
            tokens_per_expert=routing.tokens_per_expert,
            dropped_fraction=plan.dropped_fraction,
        )
        return out.view(shape)
