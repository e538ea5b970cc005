"""Tensor parallelism: communication mappings, sharded layers, vocab-parallel cross entropy, RNG streams.

Process groups are passed explicitly (``ParallelState.group("tp")``); a group of None means TP=1.
"""

from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    dense_linear,
    normal_init,
    shard_tensor,
)
from megatron.core.tensor_parallel.mappings import (
    all_gather_along_dim,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    reduce_from_region,
    reduce_scatter_along_dim,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_region,
    scatter_to_sequence_parallel_region,
    split_along_dim,
)
from megatron.core.tensor_parallel.random import (
    EXPERT_PARALLEL_RNG,
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_rng_tracker,
)

__all__ = [
    "ColumnParallelLinear",
    "Linear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "dense_linear",
    "normal_init",
    "shard_tensor",
    "vocab_parallel_cross_entropy",
    "all_gather_along_dim",
    "copy_to_region",
    "gather_from_region",
    "gather_from_sequence_parallel_region",
    "reduce_from_region",
    "reduce_scatter_along_dim",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_region",
    "scatter_to_sequence_parallel_region",
    "split_along_dim",
    "EXPERT_PARALLEL_RNG",
    "MODEL_PARALLEL_RNG",
    "RNGStatesTracker",
    "model_parallel_rng_tracker",
]
