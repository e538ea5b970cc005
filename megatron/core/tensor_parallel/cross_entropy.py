"""Cross entropy over logits whose vocabulary dim is split across the tensor-parallel group.

The full logits [.., V] are never gathered: each rank holds [.., V/tp] (rank r owns vocab ids
[r*V/tp, (r+1)*V/tp), as produced by a ColumnParallelLinear output layer) and three small
all-reduces over [..]-shaped tensors give the exact softmax cross entropy:

    m      = max_v z_v                    (all-reduce MAX: numerical stability, as logsumexp does)
    S      = sum_v exp(z_v - m)           (all-reduce SUM)
    z_t    = the target's logit - m       (all-reduce SUM; only the owning rank contributes)
    loss   = log S - z_t

Backward on the local shard: dloss/dz_v = softmax_v - [v == target], times the upstream grad.

`vocab_size` < V excludes the padding columns [vocab_size, V) (rows added to make the vocabulary
divisible by TP): they get -inf before the max, hence zero probability and zero gradient.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from torch import Tensor

from megatron.core.tensor_parallel.mappings import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: Group, vocab_size: Optional[int]) -> Tensor:
        tp = group_size(group)
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        vocab_per_rank = logits.shape[-1]
        start = group_rank(group) * vocab_per_rank
        if vocab_size is not None and start + vocab_per_rank > vocab_size:
            padding = torch.arange(start, start + vocab_per_rank, device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))

        logits_max = logits.amax(dim=-1)
        if tp > 1:
            comm.all_reduce(logits_max, group=group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)  # new tensor: the caller's logits stay untouched

        # Targets owned by another rank (or outside the vocabulary) contribute 0 here.
        outside = (target < start) | (target >= start + vocab_per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

        exp = shifted.exp_()  # reuse `shifted`'s storage: it is not needed any more
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            # One collective for both [..]-shaped sums.
            both = torch.stack([target_logit, sum_exp])
            comm.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]

        loss = torch.log(sum_exp) - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Tensor, None, None, None]:
        softmax, local_target, outside = ctx.saved_tensors
        grad_loss = grad_loss.float()
        grad = softmax * grad_loss.unsqueeze(-1)  # out of place: saved tensors stay valid for retain_graph
        # Subtract the upstream grad at the target column, on the owning rank only.
        own = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (-grad_loss * own).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: Group, vocab_size: Optional[int] = None) -> Tensor:
    """Per-token cross entropy from vocab-sharded logits, like F.cross_entropy(reduction='none').

    logits: [.., V/tp], this rank's vocabulary slice (computed in fp32; pass fp32 logits for
        Megatron numerics; the grad has the logits' dtype).
    target: [..] int64 full-vocabulary ids, identical on every rank of `group`.
    vocab_size: the real vocabulary; columns with a global id >= vocab_size are padding and excluded.
    Returns loss [..] fp32. There is no ignore_index: apply a loss mask to the result. An id outside
    [0, V) is owned by no rank and yields logsumexp(logits) (target logit taken as 0).
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal the logits shape without its last dim {tuple(logits.shape[:-1])}")
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    return _VocabParallelCrossEntropy.apply(logits, target.long(), group, vocab_size)
