"""Bytes each process group moves per training step, for one rank of a pipeline stage.

Counted the way the collective is called (what an instrumented torch.distributed sees):
all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the full input;
all-to-all: the rows this rank sends (itself included); send / recv: the tensor. Group kinds are
those of `ParallelState` ("tp", "dp", "pp", "ep", "edp", "mp", "embedding").

Which collective the code issues (megatron/core/tensor_parallel/mappings.py,
distributed/grad_buffer.py, moe/*dispatcher*.py, pipeline_parallel/p2p.py):
- TP under sequence parallelism, per layer and micro-batch: all-gather of the block input
  (attention, dense MLP) and reduce-scatter of the block output forward, the transposes backward;
  the column-parallel q_b / kv_b projections and the shared rope key all-reduce their input
  gradients; the router's sequence aux loss sums [b, E] statistics. Without SP: all-reduces.
  The vocab-parallel embedding and head communicate like a block edge; the cross entropy
  all-reduces [T] maxima and [2, T] sums. After backward the SP-marked replicated grads are
  all-reduced once over TP.
- EP, per MoE layer and micro-batch: all-to-all of the kept rows (and of the per-expert counts
  when shapes are dynamic) forward and back, reversed in backward; all-gather dispatch gathers
  tokens [W T, H], weights and routing decisions and reduce-scatters the [W T, H] outputs.
- DP: every gradient bucket once per step (dense over DP, experts over EDP): reduce-scatter with
  the distributed optimizer on nccl / hccl, else all-reduce; the distributed optimizer then
  all-gathers the updated parameters. Also the loss report, the expert-bias loads and the scalar
  pieces of the global grad norm.
- PP: one activation forward and one gradient backward per micro-batch and stage boundary; the
  first and last stage sum the shared embedding's gradient (MTP) over "embedding".
Logging is left out (the MoE statistics reduced at --log-interval iterations). On gloo (CPU)
reduce-scatter runs as an all-reduce of the whole tensor (gloo lacks it), so the "cpu" device
type counts those as all-reduces, as the code issues them. Recompute repeats the forward
collectives of what it recomputes, up to its last saved tensor (torch.utils.checkpoint stops
early, so a checkpointed region's final output reduction runs once). The all-to-all rows assume
balanced routing (the group's total is exact for dropless routing; a single rank's share follows
the router).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Optional

from megatron.core.config import DeepSeekConfig
from megatron.training.planning.buffers import BufferPlan, bucket_sizes, plan_buffers
from megatron.training.planning.layout import Layout
from megatron.training.planning.params import ParamInfo

Counts = Dict[str, Dict[str, float]]  # group kind -> op -> bytes per step


class _Tally:
    def __init__(self, native: bool) -> None:
        self.native = native
        self.bytes: Counts = defaultdict(lambda: defaultdict(float))
        self.calls: Counts = defaultdict(lambda: defaultdict(float))

    def add(self, kind: str, op: str, nbytes: float, times: float = 1.0) -> None:
        if times <= 0:
            return
        self.bytes[kind][op] += nbytes * times
        self.calls[kind][op] += times

    def reduce_scatter(self, kind: str, nbytes: float, times: float = 1.0) -> None:
        self.add(kind, "reduce_scatter" if self.native else "all_reduce", nbytes, times)

    def all_gather(self, kind: str, nbytes: float, times: float = 1.0) -> None:
        self.add(kind, "all_gather", nbytes, times)


def _tp_layer(
    t: _Tally, c: DeepSeekConfig, lay: Layout, moe: bool, attn_fwd: float, mlp_fwd: float, out_fwd: float, bwd: float
) -> None:
    """One decoder layer's TP traffic: attention forward `attn_fwd` times, its MLP forward
    `mlp_fwd` times (recompute reruns forwards) except the dense MLP's output reduction,
    `out_fwd` times, and backward `bwd` times."""
    m, h, p = c.mla, c.hidden_size, lay.param_bytes
    tok = lay.tokens_per_microbatch
    full = tok * h * p
    q_in = (m.q_lora_rank if m.q_lora_rank is not None else h) * tok * p
    # Column-parallel q_b/q_proj and kv_b take a replicated input: all-reduce its gradient; the
    # shared rope key [b, 1, s, rope] too.
    t.add("tp", "all_reduce", q_in + m.kv_lora_rank * tok * p + m.qk_rope_head_dim * tok * p, bwd)
    if lay.sequence_parallel:
        t.all_gather("tp", full, attn_fwd)  # MLA input (backward only splits)
        t.reduce_scatter("tp", full, attn_fwd)  # o_proj output
        t.all_gather("tp", full, bwd)
    else:
        t.add("tp", "all_reduce", full, attn_fwd)  # o_proj output
    if moe:
        # MoE under SP (required with TP): sequence-wise statistics over the TP ranks' slices:
        # real-token counts [B], expert counts [B, E] and score sums [B, E], all fp32.
        moe_cfg = c.moe
        if moe_cfg.load_balancing_type != "none":
            rows = lay.micro_batch_size if moe_cfg.load_balancing_type == "seq_aux_loss" else 1
            t.add("tp", "all_reduce", 4 * rows, mlp_fwd)
            t.add("tp", "all_reduce", 4 * rows * moe_cfg.num_experts, 2 * mlp_fwd)
        if moe_cfg.z_loss_coeff:
            t.add("tp", "all_reduce", 4, 2 * mlp_fwd)
    elif lay.sequence_parallel:
        t.all_gather("tp", full, mlp_fwd)  # gate_up input
        t.reduce_scatter("tp", full, bwd)
        t.reduce_scatter("tp", full, out_fwd)  # down_proj output
        t.all_gather("tp", full, bwd)
    else:
        t.add("tp", "all_reduce", full, out_fwd)  # down_proj output
        t.add("tp", "all_reduce", full, bwd)  # gate_up input gradient


def _tp_edges(t: _Tally, c: DeepSeekConfig, lay: Layout, embeddings: int, heads: int) -> None:
    """Vocab-parallel embedding lookups and output heads (+ their cross entropies)."""
    tok, h, p = lay.tokens_per_microbatch, c.hidden_size, lay.param_bytes
    full = tok * h * p
    if lay.sequence_parallel:
        t.reduce_scatter("tp", full, embeddings)
        t.all_gather("tp", full, embeddings)
        t.all_gather("tp", full, heads)
        t.reduce_scatter("tp", full, heads)
    else:
        t.add("tp", "all_reduce", full, embeddings)
        t.add("tp", "all_reduce", full, heads)
    t.add("tp", "all_reduce", 4 * tok, heads)  # logits max
    t.add("tp", "all_reduce", 8 * tok, heads)  # target logit and sum of exp


def _ep_layer(t: _Tally, c: DeepSeekConfig, lay: Layout, fwd: float, out_fwd: float, bwd: float) -> None:
    """One MoE layer's EP traffic: forward `fwd` times, except the all-gather dispatcher's final
    reduce-scatter `out_fwd` times, backward `bwd` times."""
    moe, h, p = c.moe, c.hidden_size, lay.param_bytes
    tm, k, e, w = lay.local_tokens, moe.topk, moe.num_experts, lay.ep
    cap = None if moe.capacity_factor is None else max(1, math.ceil(tm * k / e * moe.capacity_factor))
    if lay.dispatcher == "alltoall":
        if moe.pad_to_capacity and cap is not None:
            rows = e * cap
        else:
            rows = tm * k if cap is None else min(tm * k, e * cap)
            t.add("ep", "all_to_all", 8 * e, fwd)  # per-expert counts (int64)
        t.add("ep", "all_to_all", rows * h * p, 2 * fwd + 2 * bwd)  # dispatch + combine, and reversed
        return
    gathered = w * tm * h * p
    route = w * 8 * ((e * cap + tm * k) if (moe.pad_to_capacity and cap is not None) else tm * k)
    t.all_gather("ep", gathered, fwd)  # tokens
    t.all_gather("ep", w * tm * k * 4, fwd)  # routing weights (fp32)
    t.all_gather("ep", route, fwd)  # routing decisions (int64, no gradient)
    t.reduce_scatter("ep", gathered, out_fwd)  # combine
    t.all_gather("ep", gathered, bwd)  # combine backward
    t.reduce_scatter("ep", gathered, bwd)  # token gather backward
    t.reduce_scatter("ep", w * tm * k * 4, bwd)  # weight gather backward


def stage_comm(
    c: DeepSeekConfig, lay: Layout, stage: int, params: List[ParamInfo], native: bool,
    buffers: Optional[List[BufferPlan]] = None,
) -> _Tally:
    """Per-step traffic of one rank of `stage` by group kind (see the module docstring)."""
    t = _Tally(native)
    mb = lay.num_microbatches
    start, end = lay.stage_ranges[stage]
    first, last = stage == 0, stage == lay.pp - 1
    layers = list(range(start, end))
    checkpointed, chunk = lay.recompute_full_chunks(end - start)
    moe_recompute = lay.recompute_granularity == "selective" and "moe" in lay.recompute_modules
    mtp = c.mtp.num_layers if last else 0
    # (layer, recomputed by full recompute, last layer of its checkpointed chunk)
    all_layers = [
        (i, offset < checkpointed, offset < checkpointed and ((offset + 1) % chunk == 0 or offset + 1 == checkpointed))
        for offset, i in enumerate(layers)
    ]
    all_layers += [(c.num_layers + d, False, False) for d in range(mtp)]
    # The shared experts run after the combine unless overlapped with the dispatch: their saved
    # tensors then come after the combine's collectives.
    shared_after = c.moe.num_shared_experts > 0 and not lay.shared_expert_overlap
    for i, full_recompute, chunk_end in all_layers:
        moe = c.is_moe_layer(i)
        runs = mb * (2 if full_recompute or (moe and moe_recompute) else 1)
        # Recompute stops once the last saved tensor is rebuilt (torch.utils.checkpoint's early
        # stop): a region's final output reduction is not rerun when nothing saved follows it.
        region_end = chunk_end or (moe and moe_recompute and not full_recompute)
        out_runs = mb if region_end and not (moe and shared_after) else runs
        if lay.tp > 1:
            _tp_layer(t, c, lay, moe, mb * (2 if full_recompute else 1), runs, out_runs, mb)
        if moe and lay.ep > 1:
            _ep_layer(t, c, lay, runs, out_runs, mb)
    if lay.tp > 1:
        _tp_edges(t, c, lay, mb * ((1 if first else 0) + mtp), mb * ((1 if last else 0) + mtp))
    if buffers is None:
        buffers = plan_buffers(params, grad_bytes=lay.grad_bytes, dp=lay.dp, edp=lay.edp,
                               distributed_optimizer=lay.distributed_optimizer, bucket_size_mb=lay.bucket_size_mb)
    _step_collectives(t, c, lay, stage, params, buffers, native)
    if lay.pp > 1:
        boundary = lay.local_tokens * c.hidden_size * lay.param_bytes
        if not first:
            t.add("pp", "recv", boundary, mb)
            t.add("pp", "send", boundary, mb)
        if not last:
            t.add("pp", "send", boundary, mb)
            t.add("pp", "recv", boundary, mb)
    return t


def _step_collectives(
    t: _Tally, c: DeepSeekConfig, lay: Layout, stage: int, params: List[ParamInfo], plans: List[BufferPlan], native: bool
) -> None:
    """Once per step: finalize_model_grads, the optimizer, the loss report, the expert-bias update."""
    first, last = stage == 0, stage == lay.pp - 1
    gb, p = lay.grad_bytes, lay.param_bytes
    if lay.pp > 1 and (first or last):
        t.add("embedding", "all_reduce", 16)  # int32 [4]: both stages hold the same shared params
        shared = sum(x.numel for x in params if x.shared_embedding)
        if shared:
            t.add("embedding", "all_reduce", shared * gb)
    for expert, kind, size in ((False, "dp", lay.dp), (True, "edp", lay.edp)):
        if size == 1:
            continue
        for n in bucket_sizes(plans, expert):
            if lay.distributed_optimizer and native:
                t.add(kind, "reduce_scatter", n * gb)
            else:
                t.add(kind, "all_reduce", n * gb)
            if lay.distributed_optimizer:
                t.all_gather(kind, n * p)
    if lay.sequence_parallel and lay.tp > 1:
        sp = sum(x.numel for x in params if x.sequence_parallel)
        if sp:
            t.add("tp", "all_reduce", sp * gb)
    # Global grad norm: fp32 scalars.
    if lay.distributed_optimizer:
        if lay.dp > 1:
            t.add("dp", "all_reduce", 4)
        if lay.edp > 1:
            t.add("edp", "all_reduce", 4)
    if lay.ep > 1:
        t.add("ep", "all_reduce", 4)
    if lay.tp * lay.pp > 1:
        t.add("mp", "all_reduce", 4)
    start, end = lay.stage_ranges[stage]
    routers = [i for i in range(start, end) if c.is_moe_layer(i)]
    if last:
        routers += [c.num_layers + d for d in range(c.mtp.num_layers) if c.is_moe_layer(c.num_layers + d)]
    if c.moe.enable_expert_bias and routers:
        loads = 4 * len(routers) * c.moe.num_experts  # fp32 [routers, E]
        if lay.tp > 1:
            t.add("tp", "all_reduce", loads)
        if lay.dp > 1:
            t.add("dp", "all_reduce", loads)
    # The loss report: the MoE auxiliary losses of every stage are summed over "pp" (every rank),
    # then the last stage averages lm / mtp / aux over "dp".
    has_moe = any(c.is_moe_layer(i) for i in range(c.num_layers + c.mtp.num_layers))
    aux = ((c.moe.load_balancing_type != "none") + bool(c.moe.z_loss_coeff)) if has_moe else 0
    if aux and lay.pp > 1:
        t.add("pp", "all_reduce", 4 * aux)
    if last and lay.dp > 1:
        t.add("dp", "all_reduce", 4 * (1 + c.mtp.num_layers + aux))


def wire_bytes(op: str, nbytes: float, group: int) -> float:
    """Bytes one rank puts on its links for a call (ring algorithms; all-to-all without self)."""
    if group <= 1:
        return 0.0
    frac = (group - 1) / group
    return {"all_reduce": 2 * frac, "reduce_scatter": frac, "all_gather": frac, "all_to_all": frac,
            "send": 1.0, "recv": 0.0}[op] * nbytes
