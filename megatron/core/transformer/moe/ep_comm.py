"""Differentiable all-to-all over the expert-parallel group, synchronous or overlapped.

`all_to_all(x, group, output_splits, input_splits)` sends rows [sum(input_splits), ...] of `x`,
chunk i to group rank i, and returns the rows received [sum(output_splits), ...], in group-rank
order. Split sizes are host ints (torch.distributed needs them on the host); `None` means equal
chunks (the static, sync-free case). Backward is the reverse exchange: the gradient of every
received row goes back to the rank that sent it, with the two split lists swapped.

`all_to_all_async` launches the same exchange with `async_op=True` and returns a `PendingAllToAll`;
`.wait()` returns the received rows (still differentiable). Work placed between the two (the
shared experts) overlaps the communication. Backward of the async form is synchronous.

Every rank of the group must issue the same collectives in the same order, forward and backward;
autograd guarantees the backward order because every rank builds the same graph.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from megatron.core import communication as comm
from torch import Tensor

from megatron.core.tensor_parallel.mappings import Group, group_size

Splits = Optional[List[int]]


def _as_splits(splits: Optional[Sequence[int]]) -> Splits:
    return None if splits is None else [int(s) for s in splits]


def _output_buffer(x: Tensor, output_splits: Splits) -> Tensor:
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    return torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)


def _launch(x: Tensor, group: Group, output_splits: Splits, input_splits: Splits, async_op: bool) -> Tuple[Tensor, Any]:
    """Start the exchange of `x` (made contiguous); returns (output buffer, work handle or None)."""
    if input_splits is not None and sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all input splits {input_splits} do not cover the {x.shape[0]} rows sent")
    if input_splits is None and x.shape[0] % group_size(group):
        raise ValueError(f"equal-split all_to_all needs rows ({x.shape[0]}) divisible by the group size")
    x = x.contiguous()
    out = _output_buffer(x, output_splits)
    work = comm.all_to_all_single(
        out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group, async_op=async_op
    )
    return out, work


def all_to_all_raw(x: Tensor, group: Group, output_splits: Splits = None, input_splits: Splits = None) -> Tensor:
    """Non-differentiable exchange (e.g. of per-expert counts). Identity for a group of one."""
    if group_size(group) == 1:
        return x
    out, _ = _launch(x, group, _as_splits(output_splits), _as_splits(input_splits), async_op=False)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, output_splits: Splits, input_splits: Splits) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out, _ = _launch(x, group, output_splits, input_splits, async_op=False)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None, None]:
        back, _ = _launch(grad, ctx.group, ctx.input_splits, ctx.output_splits, async_op=False)
        return back, None, None, None


def all_to_all(
    x: Tensor, group: Group, output_splits: Optional[Sequence[int]] = None, input_splits: Optional[Sequence[int]] = None
) -> Tensor:
    """Differentiable all-to-all of rows (dim 0). Identity for a group of one."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, _as_splits(output_splits), _as_splits(input_splits))


class PendingAllToAll:
    """An exchange in flight: `wait()` blocks until the rows arrived and returns them (with grad)."""

    def __init__(self) -> None:
        self.work: Any = None
        self.sent: Optional[Tensor] = None  # keeps the send buffer alive until the exchange completes
        self.output: Optional[Tensor] = None

    def wait(self) -> Tensor:
        if self.output is None:
            raise RuntimeError("PendingAllToAll.wait() called twice or before launch")
        out, self.output = self.output, None
        return _AllToAllWait.apply(out, self)


class _AllToAllLaunch(torch.autograd.Function):
    """Forward launches the exchange and returns the (not yet filled) receive buffer."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, group: Group, output_splits: Splits, input_splits: Splits, pending: PendingAllToAll
    ) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out, work = _launch(x, group, output_splits, input_splits, async_op=True)
        pending.work, pending.sent = work, x
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None, None, None]:
        back, _ = _launch(grad, ctx.group, ctx.input_splits, ctx.output_splits, async_op=False)
        return back, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Forward waits for the exchange; identity on values and gradients."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, pending: PendingAllToAll) -> Tensor:
        if pending.work is not None:
            pending.work.wait()
        pending.work, pending.sent = None, None
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


class Completed(PendingAllToAll):
    """An exchange already finished (group of one, or a dispatcher without overlap): `wait()` returns it."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.result = output

    def wait(self) -> Tensor:
        return self.result


def all_to_all_async(
    x: Tensor, group: Group, output_splits: Optional[Sequence[int]] = None, input_splits: Optional[Sequence[int]] = None
) -> PendingAllToAll:
    """Launch a differentiable all-to-all; call `.wait()` on the result before reading the rows."""
    if group_size(group) == 1:
        return Completed(x)
    pending = PendingAllToAll()
    pending.output = _AllToAllLaunch.apply(x, group, _as_splits(output_splits), _as_splits(input_splits), pending)
    return pending


class Deferred(PendingAllToAll):
    """`wait()` waits for `pending` and applies `then` (a local rearrangement) to the rows."""

    def __init__(self, pending: PendingAllToAll, then: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.pending, self.then = pending, then

    def wait(self) -> Tensor:
        return self.then(self.pending.wait())
