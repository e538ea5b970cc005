"""DeepSeekMoE layer: top-k router + token dispatcher + stacked routed experts + shared experts.

out = sum_j w_tj * expert_{e_tj}(x_t) + shared(x_t), the layout of HF's DeepseekV3MoE /
DeepseekV2Moe (the shared experts are one SwiGLU of width ffn_hidden_size * num_shared_experts,
unscaled). Auxiliary losses ride on the routing weights through `attach_aux_loss`, so the
output is exactly the routed sum and backward still sees the losses.

Expert parallelism: with `parallel.ep` of size W the layer holds only this EP rank's E / W experts
and routes through the all-to-all or all-gather dispatcher over the "ep" group
(`parallel.ep.dispatcher`). The input is this rank's own tokens (sequence parallelism under
TP > 1). The router and shared experts are replicated: their gradients are partial sums over this
rank's tokens, reduced over "dp" (and "tp" under SP) by the gradient code like any replicated
weight; the expert weights carry `is_expert` and are reduced over "edp". With
`parallel.ep.overlap_shared_experts` the shared experts run while the dispatch all-to-all is in
flight (--moe-shared-expert-overlap), otherwise after the combine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from megatron.core.config import DeepSeekConfig, MoEConfig
from megatron.core.timers import DISABLED, Timers
from megatron.core.transformer.mlp import SwiGLUMLP
from megatron.core.transformer.parallel_context import SINGLE_DEVICE, ExpertParallelContext, ParallelContext
from megatron.core.transformer.moe.allgather_dispatcher import AllGatherTokenDispatcher
from megatron.core.transformer.moe.alltoall_dispatcher import AllToAllTokenDispatcher
from megatron.core.device import device_of
from megatron.core.transformer.moe.experts import GroupedExperts, fused_moe_supported, shard_expert_weights
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import DispatchPlan, TokenDispatcher


def build_token_dispatcher(moe: MoEConfig, ep: ExpertParallelContext) -> TokenDispatcher:
    """The dispatcher of an EP group: the single-device one when the group has one rank."""
    if ep.size == 1:
        return TokenDispatcher.from_config(moe)
    cls = AllToAllTokenDispatcher if ep.dispatcher == "alltoall" else AllGatherTokenDispatcher
    return cls.from_config(moe, ep.group)


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

    def __init__(self, config: DeepSeekConfig, layer_idx: int, parallel: ParallelContext = SINGLE_DEVICE) -> None:
        super().__init__()
        if not config.is_moe_layer(layer_idx):
            raise ValueError(f"layer {layer_idx} is dense under this config (first_k_dense={config.first_k_dense})")
        moe, ep = config.moe, parallel.ep
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.ep_group, self.ep_size, self.ep_rank = ep.group, ep.size, ep.rank
        self.overlap_shared_experts = ep.overlap_shared_experts
        self.dispatcher_type, self.capacity_factor = ep.dispatcher, moe.capacity_factor
        if moe.num_experts % self.ep_size:
            raise ValueError(
                f"--num-experts ({moe.num_experts}) must be divisible by --expert-model-parallel-size ({self.ep_size})"
            )
        if parallel.tp.enabled and not parallel.tp.sequence_parallel:
            raise ValueError("MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel")
        self.num_local_experts = moe.num_experts // self.ep_size
        self.local_expert_start = self.ep_rank * self.num_local_experts  # global id of local expert 0
        sequence_group = parallel.tp.group if parallel.tp.sequence_split else None
        self.router = TopKRouter(config, sequence_group=sequence_group)
        self.dispatcher = build_token_dispatcher(moe, ep)
        self.experts = GroupedExperts(
            self.num_local_experts, config.hidden_size, moe.ffn_hidden_size, use_grouped_gemm=config.kernels.use_grouped_gemm
        )
        self.shared_experts: Optional[SwiGLUMLP] = None
        if moe.num_shared_experts > 0:
            self.shared_experts = SwiGLUMLP(config.hidden_size, moe.ffn_hidden_size * moe.num_shared_experts,
                                            use_onednn=config.kernels.use_onednn_linear)
        self.last_stats: Optional[MoEStats] = None
        self.timers: Timers = DISABLED  # "moe-dispatch" / "moe-combine" when the run times its steps
        # Logging window: [E + 1] fp32, routing choices of real tokens per expert summed over the
        # counted forwards, then how many of those assignments were dropped (`count_window_load`).
        self.window_load: Optional[torch.Tensor] = None

    @torch.no_grad()
    def load_full_expert_weights(self, full_gate_up: torch.Tensor, full_down: torch.Tensor) -> None:
        """Copy this EP rank's experts from full weights gate_up [E, 2I, H] and down [E, H, I]."""
        for param, full in ((self.experts.gate_up_proj, full_gate_up), (self.experts.down_proj, full_down)):
            shard = shard_expert_weights(full, self.ep_rank, self.ep_size)
            if shard.shape != param.shape:
                raise ValueError(f"expert shard of shape {tuple(shard.shape)} does not fit {tuple(param.shape)}")
            param.copy_(shard)

    @torch.no_grad()
    def count_window_load(self) -> None:
        """Add the last forward's routing counts (and its dropped assignments) to `window_load`."""
        stats = self.last_stats
        if stats is None or stats.tokens_per_expert is None:
            return
        counts = stats.tokens_per_expert.float()
        if self.window_load is None:
            self.window_load = torch.zeros(counts.numel() + 1, dtype=torch.float32, device=counts.device)
        self.window_load[:-1] += counts
        if stats.dropped_fraction is not None:
            self.window_load[-1] += stats.dropped_fraction.float() * counts.sum()

    @torch.no_grad()
    def take_window_load(self) -> Optional[torch.Tensor]:
        """The window's [E + 1] counts (None before any counted forward); the window restarts."""
        if self.window_load is None:
            return None
        taken = self.window_load.clone()
        self.window_load.zero_()
        return taken

    def _run_experts(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Dispatched rows [N, H] -> expert outputs [N, H] (padded plans: [E_local, N / E_local, H] slots)."""
        if plan.padded:
            slots = rows.view(self.num_local_experts, -1, self.hidden_size)
            return self.experts.forward_padded(slots).reshape(-1, self.hidden_size)
        counts, all_rows_valid = plan.expert_input()
        return self.experts(rows, counts, all_rows_valid=all_rows_valid)

    def _forward_fused(self, hidden: torch.Tensor, flat: torch.Tensor, flat_mask: Optional[torch.Tensor],
                       routing) -> torch.Tensor:
        """Dispatch, experts and combine in one device kernel (Gaudi's mixture_of_experts; dropless,
        one expert-parallel rank). Padding tokens get zero routing weights, so they add nothing."""
        weights = routing.probs if flat_mask is None else routing.probs * flat_mask.unsqueeze(-1).to(routing.probs.dtype)
        out = self.experts.forward_routed(flat, routing.indices, weights, expert_offset=self.local_expert_start)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.last_stats = MoEStats(aux_losses=routing.aux_losses, tokens_per_expert=routing.tokens_per_expert,
                                   dropped_fraction=torch.zeros((), dtype=torch.float32, device=flat.device))
        return out.to(hidden.dtype).view(hidden.shape)

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE layer expects [batch, seq, {self.hidden_size}], got {tuple(hidden.shape)}")
        shape = hidden.shape
        routing = self.router(hidden, token_mask)
        flat = hidden.reshape(-1, self.hidden_size)
        flat_mask = None if token_mask is None else token_mask.reshape(-1)

        if self.ep_size == 1 and fused_moe_supported(device=device_of(flat), capacity_factor=self.capacity_factor,
                                                     has_token_mask=False, dispatcher=self.dispatcher_type, ep_size=1):
            return self._forward_fused(hidden, flat, flat_mask, routing)
        with self.timers("moe-dispatch"):
            rows, plan = self.dispatcher.dispatch_preprocess(flat, routing.probs, routing.indices, flat_mask)
            pending = self.dispatcher.dispatch_async(rows, plan)
        shared = None
        if self.shared_experts is not None and self.overlap_shared_experts:
            # The shared experts need no routing: compute them while the dispatch exchange is in flight.
            shared = self.shared_experts(flat)
        with self.timers("moe-dispatch"):
            received = pending.wait()
        expert_out = self._run_experts(received, plan)
        with self.timers("moe-combine"):
            expert_out = self.dispatcher.combine(expert_out, plan)
            out = self.dispatcher.combine_postprocess(expert_out, plan).to(hidden.dtype)
        if self.shared_experts is not None and not self.overlap_shared_experts:
            shared = self.shared_experts(flat)

        if shared is not None:
            out = out + shared
        self.last_stats = MoEStats(
            aux_losses=routing.aux_losses,
            tokens_per_expert=routing.tokens_per_expert,
            dropped_fraction=plan.dropped_fraction,
        )
        return out.view(shape)
