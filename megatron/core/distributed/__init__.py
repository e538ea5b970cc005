"""Data parallelism: flat gradient buffers, bucketed (overlapped) DP/EDP reduction, finalize.

Typical use (one wrapper per model chunk):

    ddp = DistributedDataParallel(module, DDPConfig(...), parallel_state)
    ddp.zero_grad_buffer()
    with ddp.no_sync(): loss0.backward()        # all micro-batches but the last
    loss_last.backward()                        # overlap: buckets start reducing here
    finalize_model_grads([ddp], parallel_state) # embedding sums, DP/EDP average, TP (SP) sums
"""

from megatron.core.distributed.config import DDPConfig
from megatron.core.distributed.ddp import DistributedDataParallel, is_deferred, main_grad, unwrap_model
from megatron.core.distributed.finalize_model_grads import (
    allreduce_sequence_parallel_main_grads,
    allreduce_shared_embedding_grads,
    finalize_model_grads,
)
from megatron.core.distributed.grad_buffer import Bucket, GradBuffer

__all__ = [
    "DDPConfig",
    "DistributedDataParallel",
    "GradBuffer",
    "Bucket",
    "finalize_model_grads",
    "allreduce_sequence_parallel_main_grads",
    "allreduce_shared_embedding_grads",
    "is_deferred",
    "main_grad",
    "unwrap_model",
]
