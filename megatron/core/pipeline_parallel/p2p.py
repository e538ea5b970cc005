"""Point-to-point transfers of activations (forward) and their gradients (backward) between
adjacent pipeline stages over the "pp" process group.

Shapes are static: every micro-batch's stage-boundary tensor has the caller's ``tensor_shape``
(e.g. ``[seq, micro_batch, hidden]``) and ``dtype``, so receivers pre-allocate their buffers and
no shape handshake is needed (and HPU graphs stay static).

Every transfer goes through ``torch.distributed.batch_isend_irecv``: the sends and receives of one
call are all posted before any is waited on. This matters: on gloo (checked with torch 2.13) a
blocking ``send`` does not return until the peer has posted the matching ``recv`` (rendezvous), so
two neighbours that each first send and then receive would deadlock in the 1F1B steady state;
posting both at once cannot. ``batch_isend_irecv`` works on gloo (there it issues plain
isend/irecv), NCCL and HCCL. Peers are global ranks (``ParallelState.ranks["pp"]``), with the
"pp" group passed as ``group``. Messages between a pair of ranks are matched in the order they are
posted, which both sides of the schedule keep identical.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from megatron.core.parallel_state import ParallelState


class P2PCommunicator:
    """Send/receive stage-boundary tensors of one fixed shape/dtype to the previous/next stage.

    Receives on the first stage (from "previous") and on the last stage (from "next") return None,
    and sends there are no-ops, so schedules can call them uniformly on every stage.
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        pp_ranks: Sequence[int],
        rank: int,
        tensor_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if rank not in pp_ranks:
            raise ValueError(f"rank {rank} is not in its pipeline group {list(pp_ranks)}")
        if any(int(d) < 1 for d in tensor_shape):
            raise ValueError(f"tensor_shape must have positive sizes, got {tuple(tensor_shape)}")
        self.group = group
        self.pp_ranks: List[int] = list(pp_ranks)
        self.rank = rank
        self.stage = self.pp_ranks.index(rank)
        self.tensor_shape = torch.Size(int(d) for d in tensor_shape)
        self.dtype = dtype
        self.device = torch.device(device)

    @classmethod
    def from_parallel_state(
        cls,
        parallel_state: ParallelState,
        tensor_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> "P2PCommunicator":
        return cls(parallel_state.group("pp"), parallel_state.ranks["pp"], parallel_state.rank, tensor_shape, dtype, device)

    # ---- topology --------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == len(self.pp_ranks) - 1

    @property
    def prev_rank(self) -> Optional[int]:
        """Global rank of the previous stage (None on the first stage)."""
        return None if self.is_first_stage else self.pp_ranks[self.stage - 1]

    @property
    def next_rank(self) -> Optional[int]:
        """Global rank of the next stage (None on the last stage)."""
        return None if self.is_last_stage else self.pp_ranks[self.stage + 1]

    # ---- core exchange ----------------------------------------------------------------------
    def _check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tensor.shape != self.tensor_shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"{what} has shape {tuple(tensor.shape)} / {tensor.dtype}, but the pipeline was set up for "
                f"tensor_shape {tuple(self.tensor_shape)} / {self.dtype} (static shapes: every micro-batch "
                "must produce the same stage-boundary tensor)"
            )
        # Communication needs dense memory; detach so no autograd graph is kept by the send.
        return tensor.detach().contiguous()

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device)

    def communicate(
        self,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple:
        """Post all requested transfers at once, wait for all, return ``(from_prev, from_next)``.

        A requested transfer with no peer (previous of stage 0, next of the last stage) is skipped
        and its received value is None.
        """
        ops: List[Any] = []
        from_prev = from_next = None
        # Fixed posting order (sends to prev, recv from prev, sends to next, recv from next); the
        # peer's matching ops come from its own call, so pairs match regardless of this order.
        if send_prev is not None and self.prev_rank is not None:
            ops.append(comm.p2p_op("send", self._check(send_prev, "gradient sent backward"), self.prev_rank, self.group))
        if recv_prev and self.prev_rank is not None:
            from_prev = self._empty()
            ops.append(comm.p2p_op("recv", from_prev, self.prev_rank, self.group))
        if send_next is not None and self.next_rank is not None:
            ops.append(comm.p2p_op("send", self._check(send_next, "activation sent forward"), self.next_rank, self.group))
        if recv_next and self.next_rank is not None:
            from_next = self._empty()
            ops.append(comm.p2p_op("recv", from_next, self.next_rank, self.group))
        if ops:
            for work in comm.batch_isend_irecv(ops):
                work.wait()
        return from_prev, from_next

    # ---- the named operations of the schedules ---------------------------------------------
    def recv_forward(self) -> Optional[torch.Tensor]:
        """Activation from the previous stage ``tensor_shape`` (None on the first stage)."""
        return self.communicate(recv_prev=True)[0]

    def send_forward(self, output_tensor: Optional[torch.Tensor]) -> None:
        """Activation to the next stage (no-op on the last stage)."""
        if not self.is_last_stage:
            self.communicate(send_next=output_tensor)

    def recv_backward(self) -> Optional[torch.Tensor]:
        """Gradient of this stage's output from the next stage (None on the last stage)."""
        return self.communicate(recv_next=True)[1]

    def send_backward(self, input_grad: Optional[torch.Tensor]) -> None:
        """Gradient of this stage's input to the previous stage (no-op on the first stage)."""
        if not self.is_first_stage:
            self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output_tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Send this micro-batch's activation on and receive the gradient of an earlier one's output."""
        if self.is_last_stage:
            return None
        return self.communicate(send_next=output_tensor, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Send an input gradient back and receive the next micro-batch's activation."""
        if self.is_first_stage:
            return None
        return self.communicate(send_prev=input_grad, recv_prev=True)[0]
