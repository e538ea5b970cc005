"""AdamW with fp32 master weights, global-norm clipping, and the ZeRO-1 distributed optimizer.

Training step (one call per line; all collective):

    optimizer.zero_grad()                               # zeroes the DDP gradient buffers
    for mb in micro_batches: forward + backward         # all but the last inside ddp.no_sync()
    finalize_model_grads(model_chunks, parallel_state)  # embedding sums, DP/EDP average, SP/TP sums
    optimizer.set_lr(scheduler_lr)
    success, grad_norm, num_zeros = optimizer.step()    # success False: non-finite norm, step skipped
"""

from __future__ import annotations

from typing import Sequence

from megatron.core.distributed.ddp import DistributedDataParallel
from megatron.core.optimizer.adamw import adamw_step_
from megatron.core.optimizer.clip_grads import clip_grads_, count_zeros, counts_in_norm, global_grad_norm
from megatron.core.optimizer.config import OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, merge_optimizer_shards
from megatron.core.optimizer.optimizer import STATE_FORMAT, FillFn, MegatronOptimizer, ModelChunk, ShardPiece, uses_weight_decay
from megatron.core.parallel_state import ParallelState


def build_optimizer(
    model_chunks: Sequence[ModelChunk], config: OptimizerConfig, parallel_state: ParallelState
) -> MegatronOptimizer:
    """The optimizer for this rank's model chunks.

    model_chunks: DistributedDataParallel wrappers (required with the distributed optimizer, whose
    DDPConfig must also set use_distributed_optimizer), or plain modules when dp and edp are 1.
    """
    wrapped = [isinstance(c, DistributedDataParallel) for c in model_chunks]
    for chunk, is_ddp in zip(model_chunks, wrapped):
        if is_ddp and chunk.ddp_config.use_distributed_optimizer != config.use_distributed_optimizer:
            raise ValueError(
                "DDPConfig.use_distributed_optimizer and OptimizerConfig.use_distributed_optimizer must agree"
            )
    if not all(wrapped) and (parallel_state.size("dp") > 1 or parallel_state.size("edp") > 1):
        raise ValueError(
            "with data parallelism (or expert-data parallelism) every model chunk must be wrapped in "
            "DistributedDataParallel, which reduces the gradients over dp / edp"
        )
    cls = DistributedOptimizer if config.use_distributed_optimizer else MegatronOptimizer
    return cls(model_chunks, config, parallel_state)


__all__ = [
    "OptimizerConfig",
    "MegatronOptimizer",
    "DistributedOptimizer",
    "build_optimizer",
    "merge_optimizer_shards",
    "adamw_step_",
    "global_grad_norm",
    "count_zeros",
    "counts_in_norm",
    "clip_grads_",
    "uses_weight_decay",
    "STATE_FORMAT",
    "ShardPiece",
    "FillFn",
]
