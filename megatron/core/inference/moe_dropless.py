"""DeepSeekMoE at inference: the same routing and experts as `MoELayer`, never dropping a token.

Training may cap each expert's load (capacity factor); generation must not, or a token's output
would depend on what else is in the batch. Routing is the layer's own router (`TopKRouter.route`:
fp32 gate, expert bias, no load counters or aux losses); the routed experts are the layer's own
`GroupedExperts`. Two dispatch forms, with identical results:

- dynamic (CPU, CUDA): all T * k assignments sorted by expert, grouped GEMM over the real counts;
- static (HPU graphs, torch.compile): every expert gets T slots (a token picks an expert at most
  once, so T slots can never overflow) and one batched matmul runs over [E, T, H]: shapes depend
  only on T, at the cost of E / k times the expert FLOPs, which is negligible when decoding.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.config import MoEConfig
from megatron.core.transformer.moe.token_dispatcher import TokenDispatcher


class _FullCapacityDispatcher(TokenDispatcher):
    """Padded single-device dispatch with capacity = number of tokens: fixed shapes, never a drop."""

    def __init__(self, num_experts: int, topk: int) -> None:
        # The capacity factor only satisfies the padded mode's validation; `capacity` overrides it.
        super().__init__(num_experts, topk, capacity_factor=1.0, pad_to_capacity=True)

    def capacity(self, num_tokens: int) -> Optional[int]:
        return num_tokens


def check_single_process_moe(moe_layer: torch.nn.Module) -> None:
    """ValueError unless the layer holds all experts (no expert parallelism)."""
    if getattr(moe_layer, "ep_size", 1) != 1:
        raise ValueError(
            f"inference needs a single-process model; MoE layer {moe_layer.layer_idx} is split over "
            f"{moe_layer.ep_size} expert-parallel ranks (load the checkpoint into one process first)"
        )


def dropless_moe(moe_layer: torch.nn.Module, config: MoEConfig, hidden: torch.Tensor, static: bool = False) -> torch.Tensor:
    """MoELayer's output for hidden [b, s, H] -> [b, s, H], every assignment kept.

    `moe_layer` is a single-device `MoELayer` (router, experts and shared experts are read);
    `config` the model's MoE config (routing rule); `static` picks the fixed-shape dispatch.
    """
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1])  # [T, H]
    _, probs, indices, _ = moe_layer.router.route(flat)  # the training router's rule, without its counters
    num_experts, experts = config.num_experts, moe_layer.experts
    if static:
        dispatcher: TokenDispatcher = _FullCapacityDispatcher(num_experts, config.topk)
        rows, plan = dispatcher.dispatch_preprocess(flat, probs, indices)  # [E * T, H]
        out = experts.forward_padded(rows.view(num_experts, -1, shape[-1])).reshape(-1, shape[-1])
    else:
        dispatcher = TokenDispatcher(num_experts, config.topk)  # capacity factor None: dropless
        rows, plan = dispatcher.dispatch_preprocess(flat, probs, indices)  # [T * k, H] sorted by expert
        out = experts(rows, plan.tokens_per_expert, all_rows_valid=True)
    routed = dispatcher.combine_postprocess(out, plan).to(hidden.dtype)  # [T, H]
    if moe_layer.shared_experts is not None:
        routed = routed + moe_layer.shared_experts(flat)
    return routed.view(shape)
