"""DeepSeekMoE: router, load balancing, token dispatch, grouped experts and the MoE layer."""

from megatron.core.transformer.moe.allgather_dispatcher import AllGatherTokenDispatcher
from megatron.core.transformer.moe.alltoall_dispatcher import AllToAllTokenDispatcher
from megatron.core.transformer.moe.ep_comm import all_to_all, all_to_all_async
from megatron.core.transformer.moe.experts import GroupedExperts, shard_expert_weights
from megatron.core.transformer.moe.load_balancing import attach_aux_loss, expert_aux_loss, sequence_aux_loss, z_loss
from megatron.core.transformer.moe.moe_layer import MoELayer, MoEStats, build_token_dispatcher
from megatron.core.transformer.moe.router import RouterOutput, TopKRouter, compute_routing
from megatron.core.transformer.moe.token_dispatcher import (
    DispatchPlan,
    ExpertParallelDispatcher,
    TokenDispatcher,
    expert_capacity,
)

__all__ = [
    "AllGatherTokenDispatcher",
    "AllToAllTokenDispatcher",
    "DispatchPlan",
    "ExpertParallelDispatcher",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "TokenDispatcher",
    "TopKRouter",
    "all_to_all",
    "all_to_all_async",
    "attach_aux_loss",
    "build_token_dispatcher",
    "compute_routing",
    "expert_aux_loss",
    "expert_capacity",
    "sequence_aux_loss",
    "shard_expert_weights",
    "z_loss",
]
