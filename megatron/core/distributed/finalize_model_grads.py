"""Everything between the last backward of a step and the optimizer: the gradient reductions.

The final gradient of a parameter is its average over data-parallel replicas of the sum over the
ranks that hold the same weight but saw other tokens. `finalize_model_grads` runs:

1. sum over "embedding" the grads of ``shared_embedding`` parameters when PP > 1 (the word
   embedding is used on the first stage and, for MTP, on the last one). The two stages' buffers
   have different layouts, so this sum must come BEFORE the DP reduction: these parameters live in
   "deferred" buffers that backward hooks never launch;
2. finish the DP / EDP reduction of every chunk (launching the deferred buckets);
3. sum over "tp" the grads of ``sequence_parallel`` parameters (replicated weights such as norms,
   row-parallel biases, the router, that saw only this rank's sequence chunk).

Sums commute with the DP average, so step 3 after step 2 gives the same gradient as before it,
and it lets sequence-parallel parameters reduce over DP during backward like any other (with
overlap_grad_reduce). It stays exact under the distributed optimizer: the TP ranks of a group
share one DP rank and identical buffer layouts, so their valid shards cover the same elements.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from torch import nn

from megatron.core.distributed.ddp import DistributedDataParallel, main_grad, unwrap_model
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.mappings import Group, group_size

ModelChunk = Union[DistributedDataParallel, nn.Module]


def _coalesced_all_reduce(grads: List[torch.Tensor], group: Group) -> None:
    """Sum `grads` over `group` in place with one collective per dtype (flatten, reduce, copy back)."""
    if group_size(group) == 1 or not grads:
        return
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype in sorted(by_dtype, key=str):
        same = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        comm.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _grads_with(model_chunks: Sequence[ModelChunk], attribute: str) -> List[torch.Tensor]:
    grads = []
    for chunk in model_chunks:
        for p in unwrap_model(chunk).parameters():
            if p.requires_grad and getattr(p, attribute, False):
                g = main_grad(p)
                if g is not None:
                    grads.append(g)
    return grads


def allreduce_sequence_parallel_main_grads(model_chunks: Sequence[ModelChunk], parallel_state: ParallelState) -> None:
    """Step 3: sum over "tp" the grads of parameters marked ``sequence_parallel``."""
    _coalesced_all_reduce(_grads_with(model_chunks, "sequence_parallel"), parallel_state.group("tp"))


def allreduce_shared_embedding_grads(model_chunks: Sequence[ModelChunk], parallel_state: ParallelState) -> None:
    """Step 1: sum over "embedding" (first + last stage) the grads of ``shared_embedding`` parameters.

    Both copies must carry the attribute (it also defers their DP reduction until after this sum).
    The element counts are compared first (one tiny collective), so a copy marked on one stage only
    raises a ValueError on both stages instead of leaving them blocked in mismatched collectives.
    """
    group = parallel_state.group("embedding")
    if group_size(group) == 1:
        return
    grads = _grads_with(model_chunks, "shared_embedding")
    numel = sum(g.numel() for g in grads)
    device = grads[0].device if grads else next(unwrap_model(model_chunks[0]).parameters()).device
    # int32 (every backend reduces it): tensor count and element count modulo 2^30, as max and -min.
    mine = [len(grads), numel % 2**30]
    extremes = torch.tensor(mine + [-v for v in mine], dtype=torch.int32, device=device)
    comm.all_reduce(extremes, group=group, op=dist.ReduceOp.MAX)
    high, low = extremes[:2].tolist(), [-v for v in extremes[2:].tolist()]
    if high != low:
        raise ValueError(
            f"shared_embedding parameters differ over the embedding group (this rank: {len(grads)} tensors, "
            f"{numel} elements): mark the word embedding with shared_embedding=True on BOTH the first and "
            "the last pipeline stage"
        )
    _coalesced_all_reduce(grads, group)


def finalize_model_grads(model_chunks: Sequence[ModelChunk], parallel_state: ParallelState) -> None:
    """Make every gradient final (see the module docstring). Call once per step, after the last
    micro-batch's backward and before `optimizer.step()`; collective over all ranks.

    model_chunks: the DistributedDataParallel wrappers of this rank (plain modules are accepted
    for DP = 1 runs: their ``.grad`` is then used and only steps 1 and 3 apply).
    """
    allreduce_shared_embedding_grads(model_chunks, parallel_state)
    for chunk in model_chunks:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_grad_sync()
    allreduce_sequence_parallel_main_grads(model_chunks, parallel_state)
