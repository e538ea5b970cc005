"""Autograd-aware communication between the ranks of one tensor-parallel group.

Every function takes the process group explicitly. A group of ``None`` (or of size 1, or with
torch.distributed not initialised) makes every function the identity, so a TP=1 model runs the
same code without processes.

The pairs are conjugate: one function's forward is the other's backward.

    copy_to_region                              fwd identity         bwd all-reduce
    reduce_from_region                          fwd all-reduce       bwd identity
    scatter_to_region          (last dim)       fwd split            bwd all-gather
    gather_from_region         (last dim)       fwd all-gather       bwd split
    scatter_to_sequence_parallel_region (dim 0) fwd split            bwd all-gather
    gather_from_sequence_parallel_region        fwd all-gather       bwd reduce-scatter (or split)
    reduce_scatter_to_sequence_parallel_region  fwd reduce-scatter   bwd all-gather

Sequence-parallel functions work on sequence-first activations [s, b, h] along dim 0 by default;
any other dim can be chosen. Splits need the dim to be divisible by the group size (ValueError).

The non-differentiable collectives (`all_gather_along_dim`, `reduce_scatter_along_dim`,
`split_along_dim`) are public too: checkpoint code gathers shards with them.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from torch import Tensor

Group = Optional[dist.ProcessGroup]


# ---- group helpers --------------------------------------------------------------------------
def group_size(group: Group) -> int:
    """Number of ranks in `group`; 1 for None or when torch.distributed is not initialised."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank inside `group` (not its global rank); 0 for None."""
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


def _uses_native_collectives(tensor: Tensor, group: Group) -> bool:
    """Whether the single-tensor collectives (reduce-scatter / all-gather into one buffer) can be used.

    gloo (the CPU backend) lacks reduce_scatter_tensor in most torch releases, so CPU tensors and
    gloo groups take the portable path; nccl (CUDA) and hccl (Gaudi) have both collectives.
    """
    return tensor.device.type != "cpu" and dist.get_backend(group) != "gloo"


def _reduce_scatter_single(output: Tensor, input_: Tensor, group: Group) -> None:
    comm.reduce_scatter_tensor(output, input_, group=group)


def _all_gather_single(output: Tensor, input_: Tensor, group: Group) -> None:
    comm.all_gather_into_tensor(output, input_, group=group)


def _check_divisible(size: int, world: int, dim: int, what: str) -> None:
    if size % world:
        raise ValueError(f"{what}: dim {dim} of size {size} is not divisible by the group size {world}")


# ---- non-differentiable collectives ---------------------------------------------------------
def split_along_dim(tensor: Tensor, dim: int, group: Group) -> Tensor:
    """This rank's contiguous chunk of `tensor` along `dim` (size / group size). No communication."""
    world = group_size(group)
    if world == 1:
        return tensor
    _check_divisible(tensor.shape[dim], world, dim, "split")
    return tensor.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_gather_along_dim(tensor: Tensor, dim: int, group: Group, native: Optional[bool] = None) -> Tensor:
    """Concatenate every rank's `tensor` along `dim` in group-rank order: [.., n, ..] -> [.., n*world, ..].

    native (nccl, hccl): one all-gather into a single buffer; portable (gloo / CPU): a list all-gather
    and a cat. `native` forces a path (tests); None picks by backend and device.
    """
    world = group_size(group)
    if world == 1:
        return tensor
    dim = dim % tensor.dim()
    if native is None:
        native = _uses_native_collectives(tensor, group)
    if native:
        # The single-buffer collective concatenates along dim 0: move `dim` to the front and back.
        front = tensor.movedim(dim, 0).contiguous()
        out = torch.empty((world * front.shape[0],) + tuple(front.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, front, group)
        return out.movedim(0, dim).contiguous()
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world)]
    comm.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along_dim(tensor: Tensor, dim: int, group: Group, native: Optional[bool] = None) -> Tensor:
    """Sum `tensor` over the group and return this rank's chunk along `dim`: [.., n, ..] -> [.., n/world, ..].

    This is the one place that implements reduce-scatter.
    - native (nccl, hccl): one reduce_scatter_tensor collective on a contiguous buffer whose
      leading dim is `dim`; each rank receives only its chunk (1/world of the traffic of an all-reduce).
    - portable (gloo / CPU tensors): gloo has no reduce_scatter_tensor in most torch releases, so
      all-reduce the whole tensor and keep this rank's chunk. Same result, more traffic.
    `native` forces a path (tests); None picks by backend and device.
    """
    world = group_size(group)
    if world == 1:
        return tensor
    dim = dim % tensor.dim()
    _check_divisible(tensor.shape[dim], world, dim, "reduce-scatter")
    if native is None:
        native = _uses_native_collectives(tensor, group)
    if native:
        front = tensor.movedim(dim, 0).contiguous()
        out = torch.empty((front.shape[0] // world,) + tuple(front.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _reduce_scatter_single(out, front, group)
        return out.movedim(0, dim).contiguous()
    summed = tensor.clone(memory_format=torch.contiguous_format)  # all_reduce is in place; keep the input intact
    comm.all_reduce(summed, group=group)
    return summed.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_reduce(tensor: Tensor, group: Group) -> Tensor:
    """Sum over the group, out of place (the input is left untouched)."""
    if group_size(group) == 1:
        return tensor
    out = tensor.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out, group=group)
    return out


# ---- autograd functions ---------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return split_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        return all_gather_along_dim(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """All-gather forward; backward reduce-scatters (the consumer's grads are partial per rank)
    or just splits (every rank already holds the full gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, dim: int, reduce_grad: bool) -> Tensor:
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None, None]:
        if ctx.reduce_grad:
            return reduce_scatter_along_dim(grad, ctx.dim, ctx.group), None, None, None
        return split_along_dim(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        return all_gather_along_dim(grad, ctx.dim, ctx.group), None, None


# ---- public differentiable API ----------------------------------------------------------------
def copy_to_region(x: Tensor, group: Group) -> Tensor:
    """Enter a tensor-parallel region with a replicated input (e.g. before a column-parallel GEMM).

    Forward identity; backward all-reduces, because each rank's GEMM contributes a partial input grad.
    """
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: Group) -> Tensor:
    """Leave a tensor-parallel region by summing partial results (after a row-parallel GEMM).

    Forward all-reduce; backward identity (the summed output's grad is already replicated).
    """
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: Tensor, group: Group) -> Tensor:
    """Keep this rank's slice of the last dim: [.., h] -> [.., h/tp]. Backward all-gathers."""
    return x if group_size(group) == 1 else _Split.apply(x, group, -1)


def gather_from_region(x: Tensor, group: Group) -> Tensor:
    """Concatenate every rank's slice along the last dim: [.., h/tp] -> [.., h]. Backward splits."""
    return x if group_size(group) == 1 else _Gather.apply(x, group, -1, False)


def scatter_to_sequence_parallel_region(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Keep this rank's sequence chunk: [s, b, h] -> [s/tp, b, h]. Backward all-gathers."""
    return x if group_size(group) == 1 else _Split.apply(x, group, dim)


def gather_from_sequence_parallel_region(
    x: Tensor, group: Group, dim: int = 0, tensor_parallel_output_grad: bool = True
) -> Tensor:
    """Sequence-parallel -> full sequence: [s/tp, b, h] -> [s, b, h] by all-gather along `dim`.

    Backward reduce-scatters when the gathered tensor feeds a tensor-parallel op (each rank's grad
    is a partial sum, the column-parallel case); with `tensor_parallel_output_grad=False` each rank
    holds the full grad already and backward only keeps this rank's chunk.
    """
    if group_size(group) == 1:
        return x
    return _Gather.apply(x, group, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Partial sums of the full sequence -> this rank's summed chunk: [s, b, h] -> [s/tp, b, h].

    Used after a row-parallel GEMM (and the vocab-parallel embedding) under sequence parallelism,
    in place of `reduce_from_region`. Backward all-gathers along `dim`.
    """
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, group, dim)
