"""Peak memory of one rank of every pipeline stage.

Static (alive for the whole run):
    weights      parameters x parameter bytes (with the distributed optimizer: the flat parameter
                 buffer, padding included), plus the router's fp32 expert-bias and load buffers
    gradients    the main-grad buffers (buffers.py)
    optimizer    fp32 exp_avg + exp_avg_sq (+ fp32 master weights for bf16 parameters) of the
                 elements this rank updates (whole model, or its DP / EDP shard)
Phases, each on top of the static bytes:
    forward/backward  activations of the micro-batches in flight (1F1B: min(P - s, M) on stage s;
                      one without pipelining) + a backward transient: the cross entropy's two fp32
                      [T, V/tp] gradients on the last stage, otherwise about one tensor the size of
                      the largest saved activation (the gradient being formed before the saved
                      inputs are released); with recompute, the larger of that and the moment a
                      rebuilt chunk (or MoE MLP) is alive on top of the decoder layers' kept
                      tensors (the head's are released by then)
    optimizer step    AdamW's denominators, sqrt(v) for every element of the weight-decay group at
                      once (torch._foreach_sqrt in optimizer/adamw.py), 4 bytes each
The peak is the larger phase. Not modelled: the allocator's caching and fragmentation, the device
runtime's own memory and kernels' internal workspaces (leave headroom for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.training.planning import activations as act
from megatron.training.planning.buffers import BufferPlan, optimizer_slots, plan_buffers
from megatron.training.planning.layout import Layout
from megatron.training.planning.params import ParamInfo, activated_stage_params, stage_flags, stage_parameters


@dataclass
class StageMemory:
    """Bytes of one rank of one pipeline stage (see the module docstring)."""

    stage: int
    layers: Tuple[int, int]
    params: int  # parameters held by this rank
    params_activated_per_token: int  # parameters of this stage one token touches (experts unsplit)
    weights: int
    gradients: int
    optimizer: int
    in_flight: int
    activations_per_microbatch: Dict[str, float] = field(default_factory=dict)
    transient_backward: float = 0.0
    transient_optimizer: float = 0.0
    param_list: List[ParamInfo] = field(default_factory=list, repr=False)
    buffers: List[BufferPlan] = field(default_factory=list, repr=False)
    optimizer_elements: int = 0  # elements this rank's optimizer updates

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def activations(self) -> float:
        """All activations in flight (dispatch buffers and logits included)."""
        return self.in_flight * sum(self.activations_per_microbatch.values())

    @property
    def moe_dispatch(self) -> float:
        return self.in_flight * self.activations_per_microbatch.get("moe_dispatch", 0.0)

    @property
    def logits(self) -> float:
        return self.in_flight * self.activations_per_microbatch.get("logits", 0.0)

    @property
    def peak_forward_backward(self) -> float:
        return self.static + self.activations + self.transient_backward

    @property
    def peak_optimizer_step(self) -> float:
        return self.static + self.transient_optimizer

    @property
    def peak(self) -> float:
        return max(self.peak_forward_backward, self.peak_optimizer_step)

    @property
    def peak_phase(self) -> str:
        return "forward/backward" if self.peak_forward_backward >= self.peak_optimizer_step else "optimizer step"

    def breakdown(self) -> Dict[str, float]:
        """memory_bytes of the report: static parts, activations split out, transient, peak."""
        other = self.activations - self.moe_dispatch - self.logits
        if self.peak_phase == "forward/backward":
            transient = self.peak - self.static - self.activations
        else:
            transient = self.transient_optimizer
        return {
            "weights": float(self.weights),
            "gradients": float(self.gradients),
            "optimizer": float(self.optimizer),
            "activations": float(other),
            "moe_dispatch": float(self.moe_dispatch),
            "logits": float(self.logits),
            "transient": float(transient),
            "peak": float(self.peak),
        }


def stage_memory(c: DeepSeekConfig, lay: Layout, stage: int) -> StageMemory:
    """Memory of one rank of `stage` (rank 0 of its DP / EDP group; shards differ by < 64 x group elements)."""
    pre, post = stage_flags(stage, lay.pp)
    layer_range = lay.stage_ranges[stage]
    params = stage_parameters(c, lay.tp, lay.ep, lay.sequence_parallel, layer_range, pre, post)
    p = lay.param_bytes
    plans = plan_buffers(
        params, grad_bytes=lay.grad_bytes, dp=lay.dp, edp=lay.edp,
        distributed_optimizer=lay.distributed_optimizer, bucket_size_mb=lay.bucket_size_mb,
    )
    numel = sum(x.numel for x in params)
    weights = sum(plan.numel for plan in plans) * p if lay.distributed_optimizer else numel * p
    moe_layers = [i for i in range(*layer_range) if c.is_moe_layer(i)]
    if post:
        moe_layers += [c.num_layers + d for d in range(c.mtp.num_layers) if c.is_moe_layer(c.num_layers + d)]
    if c.moe.enable_expert_bias:
        weights += 8 * c.moe.num_experts * len(moe_layers)  # fp32 expert_bias + load counts per router
    gradients = sum(plan.numel for plan in plans) * lay.grad_bytes
    slots = optimizer_slots(plans, lay.distributed_optimizer)
    per_element = 8 + (4 if p != 4 else 0)  # exp_avg, exp_avg_sq (+ master for bf16)
    acts = act.stage_activations(c, lay, stage)
    logits_tensor = acts.parts.get("logits", 0.0) / (1 + c.mtp.num_layers) if post else 0.0
    # Backward starts with every activation kept plus the loss gradients (or a layer's); a
    # recomputed unit is rebuilt later, when the head's and later layers' tensors are released.
    at_start = acts.total + max(2 * logits_tensor, acts.largest)
    body = acts.total - sum(acts.parts.get(k, 0.0) for k in act.HEAD_PARTS)
    transient = max(at_start, body + act.recompute_peak(c, lay, stage)) - acts.total
    return StageMemory(
        stage=stage,
        layers=layer_range,
        params=numel,
        params_activated_per_token=activated_stage_params(c, params, lay.ep),
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(per_element * slots.total),
        in_flight=lay.in_flight(stage),
        activations_per_microbatch=dict(acts.parts),
        transient_backward=transient,
        transient_optimizer=4.0 * slots.decay,
        param_list=params,
        buffers=plans,
        optimizer_elements=slots.total,
    )


def all_stages(c: DeepSeekConfig, lay: Layout) -> List[StageMemory]:
    return [stage_memory(c, lay, s) for s in range(lay.pp)]
