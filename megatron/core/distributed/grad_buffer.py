"""Contiguous gradient (and parameter) buffers split into buckets, and their data-parallel collectives.

One `GradBuffer` holds every parameter of one kind: same parameter dtype, same gradient dtype,
same reduction group ("dp" for dense parameters, "edp" for routed experts) and the same timing
(normal, or deferred until `finalize_model_grads` has summed it over TP / the embedding group).

Layout (element offsets into the flat 1-D buffers, N = total size):

    grad_data  [N] grad dtype   param i's gradient lives at [start_i, start_i + numel_i) and is
                                exposed as ``param.main_grad`` (a view of shape param.shape)
    param_data [N] param dtype  only with the distributed optimizer: ``param.data`` becomes the view
                                at the same offsets, so one bucket's parameters are one contiguous
                                range that a single all-gather can refresh
    starts are aligned to 64 elements (kernels such as grouped GEMM want aligned base pointers)

Parameters are laid out in REVERSE registration order (roughly the order their gradients arrive
in backward), so the first bucket fills first. A bucket is closed once it holds at least
`bucket_numel` elements; with the distributed optimizer its length is padded to a multiple of
64 x group size so that it splits into equal, aligned per-rank shards:

    bucket [start, end), L = (end - start) / size; rank r owns [start + r*L, start + (r+1)*L)

Averaging: gradients are multiplied by `scale` (1 / data-parallel size) and summed over the group
(or, with average_in_collective, multiplied by scale*size and averaged with ReduceOp.AVG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from torch import Tensor, nn

from megatron.core.tensor_parallel.mappings import Group, group_rank, group_size

ALIGN = 64  # elements


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def native_collectives(tensor: Tensor, group: Group) -> bool:
    """Whether to use single-buffer reduce-scatter / all-gather: on nccl and hccl. gloo lacks them in
    many torch releases, so CPU tensors and gloo groups take the all-reduce / list all-gather path."""
    return tensor.device.type != "cpu" and dist.get_backend(group) != "gloo"


@dataclass
class Bucket:
    """A contiguous range of one buffer whose gradients are reduced by one collective."""

    index: int
    params: List[nn.Parameter]
    start: int
    end: int
    pending: set = field(default_factory=set)  # ids of params whose grad has not arrived this step
    handle: Optional[dist.Work] = None
    launched: bool = False
    param_handle: Optional[dist.Work] = None  # in-flight all-gather of updated parameters

    def shard(self, rank: int, size: int) -> Tuple[int, int]:
        """[lo, hi) buffer offsets of rank `rank`'s equal share of this bucket."""
        length = (self.end - self.start) // size
        return self.start + rank * length, self.start + (rank + 1) * length


class GradBuffer:
    """Flat gradient storage for a list of parameters, with bucketed DP reduction.

    params: (name, parameter) in the order they should be laid out (already reversed by the caller).
    scale: factor applied to every gradient before (or inside) the collective, usually 1 / DP size.
    """

    def __init__(
        self,
        params: Sequence[Tuple[str, nn.Parameter]],
        *,
        grad_dtype: torch.dtype,
        group: Group,
        scale: float,
        bucket_numel: Optional[int],
        distributed_optimizer: bool,
        average_in_collective: bool = False,
        is_expert: bool = False,
        deferred: bool = False,
    ) -> None:
        if not params:
            raise ValueError("GradBuffer needs at least one parameter")
        devices = {p.device for _, p in params}
        dtypes = {p.dtype for _, p in params}
        if len(devices) != 1 or len(dtypes) != 1:
            raise ValueError(f"a GradBuffer holds one device and one dtype, got {devices} and {dtypes}")
        self.group, self.size, self.rank = group, group_size(group), group_rank(group)
        self.scale, self.average_in_collective = scale, average_in_collective
        self.distributed_optimizer, self.is_expert, self.deferred = distributed_optimizer, is_expert, deferred
        self.param_dtype, self.grad_dtype = dtypes.pop(), grad_dtype
        # None: pick the collectives by backend (`native_collectives`); True / False force a path (tests).
        self.native: Optional[bool] = None
        device = devices.pop()

        self.names: Dict[nn.Parameter, str] = {}
        self.ranges: Dict[nn.Parameter, Tuple[int, int]] = {}
        self.param_bucket: Dict[nn.Parameter, Bucket] = {}
        self.buckets: List[Bucket] = []
        bucket_multiple = ALIGN * self.size if distributed_optimizer else ALIGN
        offset, bucket_start, current = 0, 0, []
        for i, (name, p) in enumerate(params):
            start = _round_up(offset, ALIGN)
            self.ranges[p], self.names[p] = (start, start + p.numel()), name
            offset = start + p.numel()
            current.append(p)
            last = i == len(params) - 1
            if last or (bucket_numel is not None and offset - bucket_start >= bucket_numel):
                end = bucket_start + _round_up(offset - bucket_start, bucket_multiple)
                bucket = Bucket(index=len(self.buckets), params=current, start=bucket_start, end=end)
                self.buckets.append(bucket)
                for q in current:
                    self.param_bucket[q] = bucket
                offset = bucket_start = end
                current = []
        self.numel = offset
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data: Optional[Tensor] = None
        if distributed_optimizer:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        with torch.no_grad():
            for p, (s, e) in self.ranges.items():
                p.main_grad = self.grad_data[s:e].view(p.shape)  # type: ignore[attr-defined]
                if self.param_data is not None:
                    self.param_data[s:e].copy_(p.data.reshape(-1))
                    p.data = self.param_data[s:e].view(p.shape)
        self.reset()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def params(self) -> List[nn.Parameter]:
        return list(self.ranges)

    def reset(self) -> None:
        """Forget which grads arrived and which collectives ran (a new step begins)."""
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.handle, bucket.launched = None, False

    def zero(self) -> None:
        """Zero every gradient (padding included) and reset the bucket state."""
        self.grad_data.zero_()
        self.reset()

    def _native(self, data: Tensor) -> bool:
        return native_collectives(data, self.group) if self.native is None else self.native

    # ---- gradient reduction --------------------------------------------------------------------
    def mark_ready(self, param: nn.Parameter, async_op: bool) -> None:
        """Record that `param`'s grad for this step is complete; launch its bucket when it is full."""
        bucket = self.param_bucket[param]
        if bucket.launched:
            raise RuntimeError(
                f"gradient of {self.names[param]} arrived after its bucket's reduction started "
                "(a second backward through the same parameters on the last micro-batch?)"
            )
        bucket.pending.discard(id(param))
        if not bucket.pending:
            self.launch(bucket, async_op)

    def launch(self, bucket: Bucket, async_op: bool) -> None:
        """Scale the bucket's grads and start (or, with async_op False, run) its collective.

        Distributed optimizer on nccl/hccl: reduce-scatter, each rank receives its summed shard in
        place (the output is the rank's own slice of the input). Otherwise (or on gloo, which has
        no reduce-scatter) an all-reduce of the whole bucket; every shard is then correct too.
        """
        if bucket.launched:
            return
        bucket.launched = True
        data = self.grad_data[bucket.start : bucket.end]
        op = dist.ReduceOp.SUM
        factor = self.scale
        if self.average_in_collective and self.size > 1:
            op, factor = dist.ReduceOp.AVG, self.scale * self.size
        if factor != 1.0:
            data.mul_(factor)
        if self.size == 1:
            return
        if self.distributed_optimizer and self._native(data):
            lo, hi = bucket.shard(self.rank, self.size)
            out = self.grad_data[lo:hi]
            bucket.handle = comm.reduce_scatter_tensor(out, data, group=self.group, op=op, async_op=async_op)
        else:
            bucket.handle = comm.all_reduce(data, group=self.group, op=op, async_op=async_op)

    def launch_remaining(self, async_op: bool) -> None:
        """Launch, in bucket order (identical on every rank), every bucket not launched yet."""
        for bucket in self.buckets:
            self.launch(bucket, async_op)

    def wait(self) -> None:
        """Block until every launched collective finished."""
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    # ---- distributed optimizer -----------------------------------------------------------------
    def local_shards(self) -> List[Tuple[nn.Parameter, int, int, int, int]]:
        """This rank's pieces: (param, buffer_lo, buffer_hi, param_lo, param_hi) per overlapped param.

        param_lo/hi index the flattened parameter; the pieces of all ranks tile every parameter.
        """
        pieces = []
        for bucket in self.buckets:
            lo, hi = bucket.shard(self.rank, self.size) if self.distributed_optimizer else (bucket.start, bucket.end)
            for p in bucket.params:
                s, e = self.ranges[p]
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    pieces.append((p, a, b, a - s, b - s))
        return pieces

    def all_gather_params(self, async_op: bool = False) -> None:
        """Refresh every rank's full parameters from the owners' updated shards (distributed optimizer).

        With `async_op` every bucket's all-gather is launched and left in flight: `wait_params`
        (bucket by bucket, e.g. from a forward pre-hook) completes it.
        """
        if self.param_data is None or self.size == 1:
            return
        for bucket in self.buckets:
            data = self.param_data[bucket.start : bucket.end]
            lo, hi = bucket.shard(self.rank, self.size)
            if self._native(data):
                bucket.param_handle = comm.all_gather_into_tensor(data, self.param_data[lo:hi], group=self.group,
                                                                  async_op=async_op)
            else:
                # gloo: list all-gather straight into the bucket's (contiguous) per-rank chunks.
                chunks = list(data.chunk(self.size))
                bucket.param_handle = comm.all_gather(chunks, self.param_data[lo:hi].clone(), group=self.group,
                                                      async_op=async_op)

    def wait_params(self, bucket: Optional[Bucket] = None) -> None:
        """Complete the in-flight parameter all-gather of `bucket` (all buckets when None)."""
        for b in self.buckets if bucket is None else [bucket]:
            if b.param_handle is not None:
                b.param_handle.wait()
                b.param_handle = None
