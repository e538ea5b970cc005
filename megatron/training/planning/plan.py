"""Plan one run: parameters, memory per stage, communication per group, step time, fit.

    run = parse_args(argv, world_size, check_paths=False)      # megatron.training.arguments
    plan = plan_for_run(run, "gaudi3")
    print(format_plan(plan))                                   # or json.dumps(plan.to_dict())

`plan_for_run` takes the frozen RunConfig the training entry point would run with, so flags mean
exactly what they mean to pretrain_gpt.py. The embedding and output head are sized from the
run's vocabulary as the model pads it (params.embedding_rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron.core.config import DeepSeekConfig
from megatron.training.planning.comm import stage_comm
from megatron.training.planning.devices import DeviceSpec, get_device
from megatron.training.planning.layout import Layout, layout_from_run
from megatron.training.planning.memory import StageMemory, all_stages
from megatron.training.planning.params import ModelCounts, model_counts
from megatron.training.planning.timing import (
    COMM_EFFICIENCY,
    COMPUTE_EFFICIENCY,
    StageTime,
    stage_forward_flops,
    stage_time,
    step_seconds,
)

DEFAULT_HEADROOM = 0.1  # share of device memory kept free for the allocator, runtime and workspaces


@dataclass
class StagePlan:
    memory: StageMemory
    comm_bytes: Dict[str, Dict[str, float]]
    comm_calls: Dict[str, Dict[str, float]]
    time: StageTime
    fits: bool


@dataclass
class Plan:
    model: DeepSeekConfig
    model_name: str
    layout: Layout
    device: DeviceSpec
    counts: ModelCounts
    stages: List[StagePlan]
    step: Dict[str, float]
    headroom: float
    flops_per_step: float
    notes: List[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        return self.device.memory_bytes * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def peak_bytes(self) -> float:
        return max(s.memory.peak for s in self.stages)

    @property
    def tokens_per_second(self) -> float:
        return self.layout.global_batch_size * self.layout.seq_length / self.step["step"]

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recompute) per second over the world's peak."""
        peak = self.device.peak(self.layout.params_dtype) * self.layout.world_size
        return self.flops_per_step / self.step["step"] / peak

    def comm_totals(self) -> Dict[str, float]:
        """Bytes per step summed over every rank of the world, by group kind."""
        lay = self.layout
        ranks_per_stage = lay.tp * lay.dp
        out: Dict[str, float] = {}
        for s in self.stages:
            for kind, ops in s.comm_bytes.items():
                out[kind] = out.get(kind, 0.0) + ranks_per_stage * sum(ops.values())
        return out

    def to_dict(self) -> Dict[str, Any]:
        lay = self.layout
        c = self.counts
        return {
            "model": self.model_name,
            "total_params": c.total,
            "total_params_without_mtp": c.total_without_mtp,
            "activated_params_per_token": c.activated_per_token,
            "activated_params_per_token_without_mtp": c.activated_per_token_without_mtp,
            "activated_params_per_token_with_embedding": c.activated_per_token_with_embedding,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "layout": {
                "world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "etp": lay.etp, "dp": lay.dp,
                "edp": lay.edp, "sequence_parallel": lay.sequence_parallel, "stage_layers": list(lay.stage_layers),
                "dispatcher": lay.dispatcher, "distributed_optimizer": lay.distributed_optimizer,
                "recompute": [lay.recompute_granularity, lay.recompute_method, lay.recompute_num_layers,
                              list(lay.recompute_modules)],
                "micro_batch_size": lay.micro_batch_size, "global_batch_size": lay.global_batch_size,
                "num_microbatches": lay.num_microbatches, "seq_length": lay.seq_length,
                "params_dtype": lay.params_dtype, "grad_dtype": "float32" if lay.grad_bytes == 4 else lay.params_dtype,
            },
            "device": {
                "name": self.device.name, "memory_bytes": self.device.memory_bytes, "usable_bytes": self.usable_bytes,
                "peak_flops": self.device.peak(lay.params_dtype), "scale_up_bandwidth": self.device.scale_up_bandwidth,
                "scale_out_bandwidth": self.device.scale_out_bandwidth, "devices_per_node": self.device.devices_per_node,
                "source": self.device.source,
            },
            "stages": [
                {
                    "stage": s.memory.stage,
                    "layers": list(s.memory.layers),
                    "params": s.memory.params,
                    "params_activated_per_token": s.memory.params_activated_per_token,
                    "in_flight_microbatches": s.memory.in_flight,
                    "memory_bytes": s.memory.breakdown(),
                    "peak_phase": s.memory.peak_phase,
                    "fits": s.fits,
                    "comm_bytes": {k: dict(v) for k, v in s.comm_bytes.items()},
                    "time_s": dict(s.time.__dict__),
                }
                for s in self.stages
            ],
            "comm_bytes_per_step_all_ranks": self.comm_totals(),
            "step_time_s": self.step,
            "tokens_per_s": self.tokens_per_second,
            "mfu": self.mfu,
            "notes": list(self.notes),
        }


def plan_layout(
    model: DeepSeekConfig,
    lay: Layout,
    device: DeviceSpec,
    *,
    model_name: str = "custom",
    headroom: float = DEFAULT_HEADROOM,
    compute_efficiency: float = COMPUTE_EFFICIENCY,
    comm_efficiency: float = COMM_EFFICIENCY,
) -> Plan:
    """The plan of `model` on `lay` with `device` (see the module docstring)."""
    if not 0 <= headroom < 1:
        raise ValueError(f"memory headroom must be in [0, 1), got {headroom}")
    mems = all_stages(model, lay)
    usable = device.memory_bytes * (1 - headroom)
    stages = []
    for mem in mems:
        tally = stage_comm(model, lay, mem.stage, mem.param_list, device.native_collectives, mem.buffers)
        comm = {k: dict(v) for k, v in tally.bytes.items()}
        timing = stage_time(model, lay, mem.stage, comm, mem.optimizer_elements, device, compute_efficiency,
                            comm_efficiency)
        stages.append(StagePlan(mem, comm, {k: dict(v) for k, v in tally.calls.items()}, timing, mem.peak <= usable))
    # Model FLOPs of the step (recompute excluded), over all ranks: each stage's TP x DP ranks.
    flops = sum(3 * stage_forward_flops(model, lay, s)["forward"] * lay.num_microbatches * lay.tp * lay.dp
                for s in range(lay.pp))
    return Plan(model=model, model_name=model_name, layout=lay, device=device, counts=model_counts(model),
                stages=stages, step=step_seconds(lay, [s.time for s in stages]), headroom=headroom,
                flops_per_step=flops)


def plan_for_run(
    run: Any,
    device_type: str = "h100",
    *,
    device_memory_gb: Optional[float] = None,
    headroom: float = DEFAULT_HEADROOM,
    device: Optional[DeviceSpec] = None,
    **timing: float,
) -> Plan:
    """Plan a parsed RunConfig on `device_type` (a launcher dry run can print `format_plan`)."""
    if device is None:
        device = get_device(device_type, memory_gb=device_memory_gb, num_devices=run.distributed.world_size)
    lay = layout_from_run(run, device.kind, device.grouped_mm_dtypes)
    return plan_layout(run.model, lay, device, model_name=run.model_preset or "custom", headroom=headroom, **timing)


_MEMORY_COLUMNS = ("weights", "gradients", "optimizer", "activations", "moe_dispatch", "logits", "transient")


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f}"


def _count(n: float) -> str:
    """12.3K / 4.56M / 671.03B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: Plan) -> str:
    """A plain-text summary: model, layout, per-stage memory and traffic, step time, verdict."""
    lay, dev, c = plan.layout, plan.device, plan.counts
    lines = [
        f"model {plan.model_name}: {_count(c.total)} parameters ({_count(c.total_without_mtp)} without MTP), "
        f"{_count(c.activated_per_token)} activated per token ({_count(c.activated_per_token_without_mtp)} without MTP)",
        f"layout: {lay.world_size} x {dev.name}; TP {lay.tp}{' +SP' if lay.sequence_parallel else ''}, PP {lay.pp} "
        f"{list(lay.stage_layers)}, EP {lay.ep} ({lay.dispatcher}), DP {lay.dp} (EDP {lay.edp})"
        f"{', distributed optimizer' if lay.distributed_optimizer else ''}; micro-batch {lay.micro_batch_size} x "
        f"{lay.num_microbatches}, seq {lay.seq_length}, {lay.params_dtype} (grads "
        f"{'fp32' if lay.grad_bytes == 4 else lay.params_dtype})"
        + (f"; recompute {lay.recompute_granularity} {lay.recompute_method or ''} {lay.recompute_num_layers or ''} "
           f"{' '.join(lay.recompute_modules)}".rstrip() if lay.recompute_granularity else ""),
        "",
        "per rank: parameters held, parameters one token activates on the stage (experts whole), memory (GiB)",
        "stage layers     params   active  weights    grads    optim     acts dispatch   logits transient     peak  fits",
    ]
    for s in plan.stages:
        m, b = s.memory, s.memory.breakdown()
        lines.append(
            f"{m.stage:5d} {m.layers[0]:3d}-{m.layers[1] - 1:<3d} {_count(m.params):>8} "
            f"{_count(m.params_activated_per_token):>8}"
            + "".join(_gib(b[k]) + " " for k in _MEMORY_COLUMNS)
            + _gib(b["peak"]) + f"  {'yes' if s.fits else 'NO'}"
        )
    lines += ["", f"device memory {dev.memory_bytes / 2**30:.1f} GiB, usable {plan.usable_bytes / 2**30:.1f} GiB "
                  f"({plan.headroom:.0%} headroom); in flight per stage: {[s.memory.in_flight for s in plan.stages]}", "",
              "communication per step and rank, by group (as issued: all-reduce tensor, all-gather output, "
              "reduce-scatter input, all-to-all sent rows)"]
    for s in plan.stages:
        parts = [f"{k} {_bytes(sum(ops.values()))} (" + ", ".join(f"{op} {_bytes(v)}" for op, v in sorted(ops.items())) + ")"
                 for k, ops in sorted(s.comm_bytes.items())]
        lines.append(f"  stage {s.memory.stage}: " + "; ".join(parts))
    st = plan.step
    lines += ["", f"step time estimate: {st['step']:.3g} s (pipeline {st['pipeline']:.3g} s incl. bubble "
                  f"{st['bubble']:.3g} s, exposed DP + optimizer {st['dp_and_optimizer']:.3g} s); "
                  f"{plan.tokens_per_second:,.0f} tokens/s, MFU {plan.mfu:.1%}"]
    worst = max(plan.stages, key=lambda s: s.memory.peak)
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"verdict: {verdict}: peak {worst.memory.peak / 2**30:.2f} GiB on stage {worst.memory.stage} "
                 f"({worst.memory.peak_phase}) vs {plan.usable_bytes / 2**30:.2f} GiB usable")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
