"""Estimated step time from FLOPs, communication bytes and the device figures.

Model (per pipeline stage, one rank):
- compute: forward FLOPs of the stage's micro-batches x 3 (backward = 2 x forward), plus one more
  forward of whatever is recomputed, at `compute_efficiency` x the dense peak. FLOPs per token as
  in megatron/training/flops.py, split per rank: heads, dense MLPs and the vocabulary over TP,
  the latent projections replicated on every TP rank, routed experts at their balanced share
  (top-k rows per token, spread over EP), MoE and MTP work on the rank's own tokens under SP.
- communication on the critical path: TP and EP collectives and the pipeline sends are not
  overlapped with compute (the code issues them synchronously); the DP gradient reduction is
  hidden behind backward with --overlap-grad-reduce, else exposed, and so is the distributed
  optimizer's parameter all-gather (--overlap-param-gather). Time = wire bytes (ring algorithms,
  comm.wire_bytes) / (link bandwidth x `comm_efficiency`), with the scale-out bandwidth for a
  group that spans nodes (ranks fill nodes in Megatron order: TP fastest, then DP, then PP).
- pipeline: 1F1B runs M micro-batches in (M + P - 1) slots of the slowest stage's per-micro-batch
  time (bubble (P - 1) / (M + P - 1)).
- optimizer step: memory bound, about 40 bytes read or written per updated element (fp32 grad,
  master, two moments, the sqrt temporary, the parameter) at the memory bandwidth.
Efficiencies default to 0.5 (compute) and 0.7 (links); they are estimates, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megatron.core.config import DeepSeekConfig
from megatron.training.planning.comm import wire_bytes
from megatron.training.planning.devices import DeviceSpec
from megatron.training.planning.activations import expert_rows
from megatron.training.planning.layout import Layout
from megatron.training.planning.params import embedding_rows

COMPUTE_EFFICIENCY = 0.5
COMM_EFFICIENCY = 0.7
OPTIMIZER_BYTES_PER_ELEMENT = 40


def _attention_flops(c: DeepSeekConfig, tp: int, seq: int) -> float:
    """Forward FLOPs per token of one MLA block on one TP rank."""
    m, h = c.mla, c.hidden_size
    n = m.num_heads / tp
    if m.q_lora_rank is None:
        q = h * m.num_heads * m.qk_head_dim / tp
    else:
        q = h * m.q_lora_rank + m.q_lora_rank * n * m.qk_head_dim
    proj = q + h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
    proj += n * m.v_head_dim * h
    core = n * (m.qk_head_dim + m.v_head_dim) * (seq + 1) / 2  # causal
    return 2 * proj + 2 * core


def _moe_flops(c: DeepSeekConfig, lay: Layout) -> float:
    """Forward FLOPs of one MoE MLP for one micro-batch on one rank: router and shared experts on
    the rank's tokens, routed experts on the rows they compute (balanced routing, activations.py)."""
    moe, h = c.moe, c.hidden_size
    rows = expert_rows(c, lay)[2]
    return (2 * h * moe.num_experts + 6 * h * moe.ffn_hidden_size * moe.num_shared_experts) * lay.local_tokens \
        + 6 * h * moe.ffn_hidden_size * rows


def layer_forward_flops(c: DeepSeekConfig, lay: Layout, layer_idx: int) -> float:
    """Forward FLOPs of one decoder layer for one micro-batch on one rank."""
    t = lay.tokens_per_microbatch
    flops = _attention_flops(c, lay.tp, lay.seq_length) * t
    if c.is_moe_layer(layer_idx):
        flops += _moe_flops(c, lay)
    else:
        flops += 6 * c.hidden_size * c.ffn_hidden_size / lay.tp * t
    return flops


def stage_forward_flops(c: DeepSeekConfig, lay: Layout, stage: int) -> Dict[str, float]:
    """{"forward", "recompute"} FLOPs per micro-batch on one rank of `stage`."""
    start, end = lay.stage_ranges[stage]
    t, tl, h = lay.tokens_per_microbatch, lay.local_tokens, c.hidden_size
    per_layer = [layer_forward_flops(c, lay, i) for i in range(start, end)]
    forward = sum(per_layer)
    checkpointed, _ = lay.recompute_full_chunks(end - start)
    recompute = sum(per_layer[:checkpointed])
    if lay.recompute_granularity == "selective":
        if "core_attn" in lay.recompute_modules:
            m = c.mla
            core = 2 * (m.num_heads / lay.tp) * (m.qk_head_dim + m.v_head_dim) * (lay.seq_length + 1) / 2
            recompute += (end - start) * core * t
        if "moe" in lay.recompute_modules:
            recompute += sum(_moe_flops(c, lay) for i in range(start, end) if c.is_moe_layer(i))
    if stage == lay.pp - 1:
        v_local = embedding_rows(c, lay.tp) / lay.tp
        forward += 2 * h * v_local * t
        for d in range(c.mtp.num_layers):
            forward += 4 * h * h * tl + layer_forward_flops(c, lay, c.num_layers + d) + 2 * h * v_local * t
    return {"forward": forward, "recompute": recompute}


def group_bandwidth(kind: str, lay: Layout, dev: DeviceSpec) -> float:
    """Per-direction bytes/s of the links a group of `kind` uses (scale-out once it spans nodes)."""
    span = {
        "tp": lay.tp,
        "dp": lay.tp * lay.dp,
        "edp": lay.tp * lay.dp,
        "ep": lay.etp * lay.ep,
        "pp": lay.tp * lay.dp * lay.pp,
        "embedding": lay.tp * lay.dp * lay.pp,
        "mp": lay.tp * lay.dp * lay.pp,
    }.get(kind, lay.world_size)
    return dev.scale_up_bandwidth if span <= dev.devices_per_node else dev.scale_out_bandwidth


def group_size(kind: str, lay: Layout) -> int:
    return {"tp": lay.tp, "dp": lay.dp, "edp": lay.edp, "ep": lay.ep, "pp": 2, "embedding": 2,
            "mp": lay.tp * lay.pp}.get(kind, lay.world_size)


@dataclass
class StageTime:
    compute: float
    tp: float
    ep: float
    pp: float
    dp_exposed: float
    optimizer: float

    @property
    def per_step_critical(self) -> float:
        return self.compute + self.tp + self.ep + self.pp


def comm_seconds(bytes_by_op: Dict[str, float], kind: str, lay: Layout, dev: DeviceSpec, efficiency: float) -> float:
    size = group_size(kind, lay)
    wire = sum(wire_bytes(op, b, size) for op, b in bytes_by_op.items())
    return wire / (group_bandwidth(kind, lay, dev) * efficiency)


def stage_time(
    c: DeepSeekConfig, lay: Layout, stage: int, comm: Dict[str, Dict[str, float]], optimizer_elements: int,
    dev: DeviceSpec, compute_efficiency: float = COMPUTE_EFFICIENCY, comm_efficiency: float = COMM_EFFICIENCY,
) -> StageTime:
    flops = stage_forward_flops(c, lay, stage)
    total = lay.num_microbatches * (3 * flops["forward"] + flops["recompute"])
    compute = total / (dev.peak(lay.params_dtype) * compute_efficiency)
    sec = {k: comm_seconds(v, k, lay, dev, comm_efficiency) for k, v in comm.items()}
    dp = sum(sec.get(k, 0.0) for k in ("dp", "edp", "embedding", "mp"))
    if lay.overlap_grad_reduce:
        # Only the parameter all-gather (distributed optimizer) stays exposed, unless overlapped too.
        gather = {k: {"all_gather": v.get("all_gather", 0.0)} for k, v in comm.items() if k in ("dp", "edp")}
        dp = 0.0 if lay.overlap_param_gather else sum(comm_seconds(v, k, lay, dev, comm_efficiency) for k, v in gather.items())
    optimizer = optimizer_elements * OPTIMIZER_BYTES_PER_ELEMENT / dev.memory_bandwidth
    return StageTime(compute=compute, tp=sec.get("tp", 0.0), ep=sec.get("ep", 0.0), pp=sec.get("pp", 0.0),
                     dp_exposed=dp, optimizer=optimizer)


def step_seconds(lay: Layout, stages: List[StageTime]) -> Dict[str, float]:
    """Pipeline step estimate: (M + P - 1) slots of the slowest stage's micro-batch, then the
    exposed data-parallel communication and the optimizer of the slowest stage."""
    m = lay.num_microbatches
    per_mb = max(s.per_step_critical for s in stages) / m
    pipeline = (m + lay.pp - 1) * per_mb
    tail = max(s.dp_exposed + s.optimizer for s in stages)
    return {"pipeline": pipeline, "bubble": (lay.pp - 1) * per_mb, "dp_and_optimizer": tail, "step": pipeline + tail}
