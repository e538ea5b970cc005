"""Exact sizes of the gradient buffers and optimizer state of one rank, by replaying the layout
rules of `megatron.core.distributed.grad_buffer` and `megatron.core.optimizer`.

DistributedDataParallel groups a rank's parameters by (is_expert, shared_embedding, dtype), in
reverse registration order, into one flat `GradBuffer` each: every parameter starts at a multiple
of 64 elements, a bucket closes once it holds `bucket_size_mb` MiB of gradients, and its length is
rounded up to 64 elements (64 x group size with the distributed optimizer, so it splits into equal
per-rank shards). Main grads live in these buffers (fp32 with --bf16 or
--accumulate-allreduce-grads-in-fp32, else the parameter dtype); with the distributed optimizer
the parameters themselves move into a flat buffer of the same layout.

The optimizer keeps fp32 exp_avg and exp_avg_sq (and an fp32 master copy for bf16 parameters)
for the elements it updates: whole parameters, or with the distributed optimizer the pieces of
the parameters that overlap this rank's shard of every bucket (dense buckets shard over DP,
expert buckets over EDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.training.planning.params import ParamInfo

ALIGN = 64  # elements (grad_buffer.ALIGN)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class BufferPlan:
    """One GradBuffer: its parameters' ranges and its buckets."""

    is_expert: bool
    deferred: bool  # shared_embedding: reduced only by finalize_model_grads
    group_size: int  # DP (dense) or EDP (experts)
    numel: int = 0
    params: List[Tuple[ParamInfo, int, int]] = field(default_factory=list)  # (param, start, end)
    buckets: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) element ranges
    bucket_members: List[Tuple[int, int]] = field(default_factory=list)  # [first, last) indices into params

    def shard(self, bucket: Tuple[int, int], rank: int) -> Tuple[int, int]:
        start, end = bucket
        length = (end - start) // self.group_size
        return start + rank * length, start + (rank + 1) * length


def plan_buffers(
    params: Sequence[ParamInfo],
    *,
    grad_bytes: int,
    dp: int,
    edp: int,
    distributed_optimizer: bool,
    bucket_size_mb: Optional[float] = 40.0,
) -> List[BufferPlan]:
    """The GradBuffers DistributedDataParallel builds for `params` (registration order)."""
    kinds: Dict[Tuple[bool, bool], List[ParamInfo]] = {}
    for p in reversed(list(params)):
        kinds.setdefault((p.is_expert, p.shared_embedding), []).append(p)
    bucket_numel = None
    if bucket_size_mb is not None:
        bucket_numel = max(1, int(bucket_size_mb * 2**20) // grad_bytes)
    plans = []
    for key in sorted(kinds):  # DDP sorts by (is_expert, deferred, dtype); one dtype per stage
        is_expert, deferred = key
        size = edp if is_expert else dp
        plan = BufferPlan(is_expert=is_expert, deferred=deferred, group_size=size)
        multiple = ALIGN * size if distributed_optimizer else ALIGN
        members = kinds[key]
        offset = bucket_start = first = 0
        for i, p in enumerate(members):
            start = _round_up(offset, ALIGN)
            plan.params.append((p, start, start + p.numel))
            offset = start + p.numel
            last = i == len(members) - 1
            if last or (bucket_numel is not None and offset - bucket_start >= bucket_numel):
                end = bucket_start + _round_up(offset - bucket_start, multiple)
                plan.buckets.append((bucket_start, end))
                plan.bucket_members.append((first, i + 1))
                offset = bucket_start = end
                first = i + 1
        plan.numel = offset
        plans.append(plan)
    return plans


@dataclass(frozen=True)
class OptimizerSlots:
    """Elements of this rank's optimizer state, split by weight-decay group."""

    decay: int
    no_decay: int
    largest: int  # largest single slot (a per-tensor temporary of the update is this big)

    @property
    def total(self) -> int:
        return self.decay + self.no_decay


def optimizer_slots(
    plans: Sequence[BufferPlan], distributed_optimizer: bool, dp_rank: int = 0, edp_rank: int = 0
) -> OptimizerSlots:
    """Elements the optimizer of one rank updates (MegatronOptimizer / DistributedOptimizer._pieces)."""
    decay = no_decay = largest = 0
    for plan in plans:
        rank = edp_rank if plan.is_expert else dp_rank
        for bucket, (first, last) in zip(plan.buckets, plan.bucket_members):
            lo, hi = plan.shard(bucket, rank) if distributed_optimizer else bucket
            for p, s, e in plan.params[first:last]:
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    n = b - a
                    largest = max(largest, n)
                    if p.decays:
                        decay += n
                    else:
                        no_decay += n
    return OptimizerSlots(decay=decay, no_decay=no_decay, largest=largest)


def bucket_sizes(plans: Sequence[BufferPlan], expert: bool) -> List[int]:
    """Element counts of the buckets of the dense (expert=False) or expert buffers."""
    return [end - start for plan in plans if plan.is_expert == expert for start, end in plan.buckets]
