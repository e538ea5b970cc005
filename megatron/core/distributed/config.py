"""Configuration of the data-parallel gradient buffers (Megatron's `DistributedDataParallelConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DDPConfig:
    """How gradients are accumulated and reduced over the data-parallel ranks.

    bucket_size_mb: size of one communication bucket in MiB of gradient storage. Smaller buckets
        start their collective earlier in backward (more overlap) but pay more launch latency.
        None puts every parameter of a buffer in a single bucket.
    overlap_grad_reduce: start a bucket's all-reduce / reduce-scatter from the backward hooks as
        soon as all its parameters have their gradient (Megatron's --overlap-grad-reduce).
    use_distributed_optimizer: reduce-scatter gradients so each DP rank keeps only its shard
        (ZeRO-1), and keep parameters in a flat buffer so updated shards can be all-gathered.
        Must agree with the optimizer's `use_distributed_optimizer`.
    grad_reduce_in_fp32: accumulate and reduce gradients in fp32 even for bf16 parameters
        (Megatron's --accumulate-allreduce-grads-in-fp32; Megatron turns it on with --bf16).
    average_in_collective: average with ReduceOp.AVG inside the collective instead of scaling
        the gradients by 1/size before a SUM. Needs a backend with ReduceOp.AVG (nccl; gloo in
        recent torch); the backend raises otherwise.
    """

    bucket_size_mb: Optional[float] = 40.0
    overlap_grad_reduce: bool = False
    # Distributed optimizer: leave the updated parameters' all-gather in flight after the step and
    # wait for each bucket just before the first forward that uses it (--overlap-param-gather).
    overlap_param_gather: bool = False
    use_distributed_optimizer: bool = False
    grad_reduce_in_fp32: bool = False
    average_in_collective: bool = False

    def __post_init__(self) -> None:
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
        if self.bucket_size_mb is not None and not self.bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0 (or None for one bucket), got {self.bucket_size_mb}")
