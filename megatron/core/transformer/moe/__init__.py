"""DeepSeekMoE: router, load balancing, token dispatch, grouped experts and the MoE layer."""

from megatron.core.transformer.moe.experts import GroupedExperts
from megatron.core.transformer.moe.load_balancing import (
    attach_aux_loss,
    expert_aux_loss,
    sequence_aux_loss,
    set_aux_loss_scale,
    update_expert_bias,
    z_loss,
)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoEStats
from megatron.core.transformer.moe.router import RouterOutput, TopKRouter, compute_routing
from megatron.core.transformer.moe.token_dispatcher import DispatchPlan, TokenDispatcher, expert_capacity

__all__ = [
    "DispatchPlan",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "TokenDispatcher",
    "TopKRouter",
    "attach_aux_loss",
    "compute_routing",
    "expert_aux_loss",
    "expert_capacity",
    "sequence_aux_loss",
    "set_aux_loss_scale",
    "update_expert_bias",
    "z_loss",
]
