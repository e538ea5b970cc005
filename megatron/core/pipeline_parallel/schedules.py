"""Forward/backward schedules over micro-batches: plain gradient accumulation and pipelined 1F1B.

Both schedules share one signature (pick with `get_forward_backward_func`)::

    func(forward_step_func, data_iterator, model, num_microbatches, tensor_shape, dtype,
         parallel_state, forward_only=False, device=None, grad_sync_context=None,
         aux_loss_scale_func=None) -> list[dict[str, Tensor]]

Protocol:

* ``model`` is this stage's module (or a one-element list of it). ``model.set_input_tensor(t)``
  sets the stage input: the activation ``t`` of shape ``tensor_shape`` received from the previous
  stage, or None on the first stage (which reads its tokens from the data iterator instead).
* ``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`` runs one micro-batch.
  On a non-last stage ``output_tensor`` is the activation sent to the next stage and must have
  exactly ``tensor_shape`` / ``dtype`` (static shapes). On the last stage
  ``loss_func(output_tensor) -> (loss, reported)``: ``loss`` a scalar (the micro-batch's mean loss),
  ``reported`` a dict of detached tensors for logging.
* Each micro-batch's loss is divided by ``num_microbatches`` before backward, so the accumulated
  gradient of ``num_microbatches`` equal-size micro-batches equals the gradient of the mean loss
  of one batch holding all of them. The schedules return the per-micro-batch ``reported`` dicts
  (last stage only, ``[]`` elsewhere); the caller averages them.

Losses added inside the model (MoE auxiliary losses attached through autograd by
`megatron.core.transformer.moe.attach_aux_loss`) do not pass through ``loss_func`` and are not
divided here; their gradient factor must be set to ``1 / num_microbatches`` as well. Pass
``aux_loss_scale_func`` (e.g. ``functools.partial(moe.set_aux_loss_scale, model)``) and the
schedule calls it with ``1 / num_microbatches`` before the first micro-batch, or set it yourself.

``grad_sync_context`` is a callable returning a context manager under which data-parallel
gradient reduction is deferred (e.g. a DDP wrapper's ``no_sync``). Every backward except the last
micro-batch's runs inside it, so the reduction is triggered once, by the last backward.

``device`` (a `megatron.core.device.Device`, optional): ``device.mark_step()`` is called after each
micro-batch forward and each backward, the graph boundaries of HPU lazy mode (no-op elsewhere).

``forward_only`` (evaluation): no backward, no gradients, forwards run under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, ContextManager, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from megatron.core.parallel_state import ParallelState
from megatron.core.timers import DISABLED, Timers
from megatron.core.pipeline_parallel.p2p import P2PCommunicator

LossFunc = Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
ForwardStepFunc = Callable[[Any, nn.Module], Tuple[torch.Tensor, LossFunc]]
Reported = List[Dict[str, torch.Tensor]]


# ---- helpers ---------------------------------------------------------------------------------
def _unwrap_model(model: Union[nn.Module, Sequence[nn.Module]]) -> nn.Module:
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"got {len(model)} model chunks; interleaved (virtual pipeline) schedules are not implemented, "
                "pass this stage's single module"
            )
        return model[0]
    return model


def _check_microbatches(num_microbatches: int) -> None:
    if num_microbatches < 1:
        raise ValueError(
            f"num_microbatches must be >= 1 (--global-batch-size / (--micro-batch-size x data-parallel size)), "
            f"got {num_microbatches}"
        )


def _model_device(model: nn.Module) -> torch.device:
    """Where received activations/gradients are allocated: the stage's parameters' device."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _set_input(model: nn.Module, input_tensor: Optional[torch.Tensor]) -> None:
    setter = getattr(model, "set_input_tensor", None)
    if setter is None:
        if input_tensor is not None:
            raise ValueError("a pipeline stage after the first needs model.set_input_tensor(tensor) to take its input")
        return
    setter(input_tensor)


class _GradSync:
    """Holds ``grad_sync_context()`` open until `release`, so only the last backward syncs."""

    def __init__(self, grad_sync_context: Optional[Callable[[], ContextManager]], enabled: bool) -> None:
        self._stack = contextlib.ExitStack()
        if grad_sync_context is not None and enabled:
            self._stack.enter_context(grad_sync_context())

    def release(self) -> None:
        self._stack.close()


class _Runner:
    """Forward and backward of one micro-batch on this stage (shared by both schedules)."""

    def __init__(
        self,
        forward_step_func: ForwardStepFunc,
        data_iterator: Optional[Iterator],
        model: nn.Module,
        num_microbatches: int,
        is_last_stage: bool,
        forward_only: bool,
        device: Optional[Any],
        timers: Timers = DISABLED,
        backward_context: Optional[Callable[[], ContextManager]] = None,
    ) -> None:
        self.timers = timers
        self.backward_context = backward_context or contextlib.nullcontext
        self.forward_step_func = forward_step_func
        self.data_iterator = data_iterator
        self.model = model
        self.num_microbatches = num_microbatches
        self.is_last_stage = is_last_stage
        self.forward_only = forward_only
        self.device = device
        self.reported: Reported = []

    def _mark_step(self) -> None:
        if self.device is not None:
            self.device.mark_step()

    def forward(self, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """Run one micro-batch; on the last stage return its loss / num_microbatches (a scalar)."""
        _set_input(self.model, input_tensor)
        with self.timers("forward"):
            output_tensor, loss_func = self.forward_step_func(self.data_iterator, self.model)
        if self.is_last_stage:
            loss, reported = loss_func(output_tensor)
            if loss.numel() != 1:
                raise ValueError(f"loss_func must return a scalar loss, got shape {tuple(loss.shape)}")
            self.reported.append(reported)
            output_tensor = loss.reshape(()) / self.num_microbatches
        _set_input(self.model, None)  # drop the model's reference; the schedule owns in-flight inputs
        self._mark_step()
        return output_tensor

    def backward(
        self,
        input_tensor: Optional[torch.Tensor],
        output_tensor: torch.Tensor,
        output_grad: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        """Backward of one micro-batch; returns d(loss)/d(input_tensor) for the previous stage.

        On the last stage ``output_tensor`` is the scaled scalar loss and ``output_grad`` None; on
        other stages ``output_grad`` is the gradient received for ``output_tensor`` (same shape).
        """
        with self.timers("backward"), self.backward_context():
            if output_grad is None:
                torch.autograd.backward(output_tensor)
            else:
                torch.autograd.backward(output_tensor, grad_tensors=output_grad)
        self._mark_step()
        if input_tensor is None:
            return None
        if input_tensor.grad is None:
            # The stage's output did not depend on its input; the previous stage still waits for a gradient.
            return torch.zeros_like(input_tensor)
        return input_tensor.grad


# ---- schedules -------------------------------------------------------------------------------
def forward_backward_no_pipelining(
    forward_step_func: ForwardStepFunc,
    data_iterator: Optional[Iterator],
    model: Union[nn.Module, Sequence[nn.Module]],
    num_microbatches: int,
    tensor_shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    parallel_state: Optional[ParallelState] = None,
    forward_only: bool = False,
    device: Optional[Any] = None,
    grad_sync_context: Optional[Callable[[], ContextManager]] = None,
    aux_loss_scale_func: Optional[Callable[[float], None]] = None,
    timers: Timers = DISABLED,
    backward_context: Optional[Callable[[], ContextManager]] = None,
) -> Reported:
    """Gradient accumulation over ``num_microbatches`` on one stage (PP=1): forward then backward
    of each micro-batch in turn, so only one micro-batch's activations are alive at a time.

    ``tensor_shape`` / ``dtype`` are unused (nothing is communicated); they keep the signature
    common with the pipelined schedule. Returns the per-micro-batch reported dicts.
    """
    _check_microbatches(num_microbatches)
    if parallel_state is not None and len(parallel_state.ranks.get("pp", [parallel_state.rank])) > 1:
        raise ValueError(
            "forward_backward_no_pipelining runs a whole model on one stage; with "
            "--pipeline-model-parallel-size > 1 use forward_backward_pipelining_1f1b (get_forward_backward_func)"
        )
    model = _unwrap_model(model)
    if aux_loss_scale_func is not None:
        aux_loss_scale_func(1.0 / num_microbatches)
    runner = _Runner(forward_step_func, data_iterator, model, num_microbatches, True, forward_only, device, timers, backward_context)
    if forward_only:
        with torch.no_grad():
            for _ in range(num_microbatches):
                runner.forward(None)
        return runner.reported

    sync = _GradSync(grad_sync_context, enabled=True)
    try:
        for i in range(num_microbatches):
            if i == num_microbatches - 1:
                sync.release()  # the last backward runs with gradient sync enabled
            loss = runner.forward(None)
            runner.backward(None, loss, None)
            del loss
    finally:
        sync.release()
    return runner.reported


def forward_backward_pipelining_1f1b(
    forward_step_func: ForwardStepFunc,
    data_iterator: Optional[Iterator],
    model: Union[nn.Module, Sequence[nn.Module]],
    num_microbatches: int,
    tensor_shape: Sequence[int],
    dtype: torch.dtype,
    parallel_state: ParallelState,
    forward_only: bool = False,
    device: Optional[Any] = None,
    grad_sync_context: Optional[Callable[[], ContextManager]] = None,
    aux_loss_scale_func: Optional[Callable[[float], None]] = None,
    timers: Timers = DISABLED,
    backward_context: Optional[Callable[[], ContextManager]] = None,
) -> Reported:
    """One-forward-one-backward pipeline schedule (PipeDream-Flush) on this stage.

    Stage ``s`` of ``P`` runs ``W = min(P - s - 1, M)`` warmup forwards, then alternates one
    forward and one backward for the remaining ``M - W`` micro-batches, then ``W`` cooldown
    backwards. At most ``W + 1`` micro-batches are in flight per stage (their input and output
    tensors kept for backward), instead of all ``M`` as in fill-drain (GPipe); the pipeline bubble
    is ``(P - 1) / (M + P - 1)`` of the step. ``tensor_shape`` is the stage-boundary activation
    shape (e.g. ``[seq, micro_batch, hidden]``), the same on every stage and micro-batch.
    """
    _check_microbatches(num_microbatches)
    model = _unwrap_model(model)
    comm = P2PCommunicator.from_parallel_state(parallel_state, tensor_shape, dtype, _model_device(model))
    if aux_loss_scale_func is not None:
        aux_loss_scale_func(1.0 / num_microbatches)
    runner = _Runner(
        forward_step_func, data_iterator, model, num_microbatches, comm.is_last_stage, forward_only, device, timers,
        backward_context,
    )

    if forward_only:
        # Evaluation: every stage forwards the micro-batches in order; nothing is kept.
        with torch.no_grad():
            for _ in range(num_microbatches):
                output = runner.forward(comm.recv_forward())
                comm.send_forward(output)
                del output
        return runner.reported

    def receive_input(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # Received activations are leaves of this stage's graph; their .grad is what we send back.
        return tensor.requires_grad_(True) if tensor is not None else None

    num_stages = len(comm.pp_ranks)
    num_warmup = min(num_stages - comm.stage - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    in_flight: Deque[Tuple[Optional[torch.Tensor], torch.Tensor]] = deque()  # (input, output) per micro-batch
    backwards_done = 0
    sync = _GradSync(grad_sync_context, enabled=True)

    def backward_one(output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        nonlocal backwards_done
        input_tensor, output_tensor = in_flight.popleft()  # oldest micro-batch first
        if backwards_done == num_microbatches - 1:
            sync.release()
        input_grad = runner.backward(input_tensor, output_tensor, output_grad)
        backwards_done += 1
        return input_grad

    try:
        # Warmup: fill the pipeline with forwards.
        for _ in range(num_warmup):
            input_tensor = receive_input(comm.recv_forward())
            output_tensor = runner.forward(input_tensor)
            comm.send_forward(output_tensor)
            in_flight.append((input_tensor, output_tensor))

        # Steady state: one forward, one backward.
        input_tensor = receive_input(comm.recv_forward()) if num_steady > 0 else None
        for i in range(num_steady):
            output_tensor = runner.forward(input_tensor)
            in_flight.append((input_tensor, output_tensor))
            output_grad = comm.send_forward_recv_backward(output_tensor)
            del input_tensor, output_tensor
            input_grad = backward_one(output_grad)
            del output_grad
            if i == num_steady - 1:
                comm.send_backward(input_grad)
                input_tensor = None
            else:
                input_tensor = receive_input(comm.send_backward_recv_forward(input_grad))
            del input_grad

        # Cooldown: drain the backwards of the warmup micro-batches.
        for _ in range(num_warmup):
            input_grad = backward_one(comm.recv_backward())
            comm.send_backward(input_grad)
            del input_grad
    finally:
        sync.release()
        in_flight.clear()
    return runner.reported


def get_forward_backward_func(pp_size: int) -> Callable[..., Reported]:
    """The schedule for ``--pipeline-model-parallel-size`` ``pp_size``: 1F1B when > 1, else accumulation."""
    if pp_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp_size}")
    return forward_backward_pipelining_1f1b if pp_size > 1 else forward_backward_no_pipelining
