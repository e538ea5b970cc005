"""Schedules in one process: gradient accumulation == one big batch, grad-sync deferral,
mark_step calls, forward-only evaluation, the aux-loss scale hook, and input errors."""

import contextlib
import copy

import pytest
import torch

from megatron.core.parallel_state import ParallelConfig, ParallelState, RankGrid
from megatron.core.pipeline_parallel import (
    P2PCommunicator,
    forward_backward_no_pipelining,
    forward_backward_pipelining_1f1b,
    get_forward_backward_func,
)
from tests.unit.core.pipeline_parallel.pp_toy_model import TENSOR_SHAPE, build_full, forward_step, make_data, micro_batches, reference, rel_err

TOL = 1e-6


class CountingDevice:
    """Stands in for megatron.core.device.Device: counts lazy-mode graph boundaries."""

    def __init__(self):
        self.steps = 0

    def mark_step(self):
        self.steps += 1


def _run(schedule, model, m, state, **kwargs):
    tokens, labels = make_data(m)
    return schedule(forward_step, micro_batches(tokens, labels), model, m, TENSOR_SHAPE, torch.float32, state, **kwargs)


@pytest.mark.parametrize("aux_coeff", [0.0, 0.3])
def test_accumulation_equals_one_big_batch_for_both_schedules(aux_coeff):
    state = ParallelState.build(ParallelConfig())  # 1 rank, no torch.distributed
    full = build_full(3, aux_coeff)
    for m in (1, 2, 4):
        tokens, labels = make_data(m)
        ref_loss, ref_grads = reference(full, tokens, labels)
        for schedule in (forward_backward_no_pipelining, forward_backward_pipelining_1f1b):
            model = copy.deepcopy(full)
            scales = []

            def set_scale(scale, model=model):
                scales.append(scale)
                model.set_aux_scale(scale)

            device = CountingDevice()
            reported = _run(schedule, model, m, state, device=device, aux_loss_scale_func=set_scale)
            assert scales == [1.0 / m]
            assert len(reported) == m and device.steps == 2 * m
            loss = torch.stack([r["lm loss"] for r in reported]).mean()
            assert rel_err(loss, ref_loss) < TOL, (schedule.__name__, m)
            for name, p in model.named_parameters():
                assert rel_err(p.grad, ref_grads[name]) < TOL, (schedule.__name__, m, name)


def test_grad_sync_deferred_until_last_backward():
    state = ParallelState.build(ParallelConfig())
    for schedule in (forward_backward_no_pipelining, forward_backward_pipelining_1f1b):
        model = build_full(2)
        in_no_sync = {"on": False}
        events = []

        @contextlib.contextmanager
        def no_sync():
            events.append("enter")
            in_no_sync["on"] = True
            try:
                yield
            finally:
                in_no_sync["on"] = False
                events.append("exit")

        model.head.weight.register_hook(lambda g: events.append("grad-no-sync" if in_no_sync["on"] else "grad-sync"))
        _run(schedule, model, 3, state, grad_sync_context=no_sync)
        assert events == ["enter", "grad-no-sync", "grad-no-sync", "exit", "grad-sync"], schedule.__name__
        # One micro-batch: its backward is the last one, so it syncs.
        events.clear()
        model = build_full(2)
        model.head.weight.register_hook(lambda g: events.append("grad-no-sync" if in_no_sync["on"] else "grad-sync"))
        _run(schedule, model, 1, state, grad_sync_context=no_sync)
        assert events == ["enter", "exit", "grad-sync"]


def test_forward_only_returns_losses_and_leaves_grads_none():
    state = ParallelState.build(ParallelConfig())
    full = build_full(2, aux_coeff=0.3)
    m = 3
    tokens, labels = make_data(m)
    expected = [reference(full, t, l)[0] for t, l in zip(tokens.split(2), labels.split(2))]
    for schedule in (forward_backward_no_pipelining, forward_backward_pipelining_1f1b):
        model = copy.deepcopy(full)
        device = CountingDevice()
        reported = _run(schedule, model, m, state, forward_only=True, device=device)
        assert device.steps == m
        assert [rel_err(r["lm loss"], e) < TOL for r, e in zip(reported, expected)] == [True] * m
        assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_rejected():
    state = ParallelState.build(ParallelConfig())
    assert get_forward_backward_func(1) is forward_backward_no_pipelining
    assert get_forward_backward_func(4) is forward_backward_pipelining_1f1b
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size"):
        get_forward_backward_func(0)
    model = build_full(1)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        _run(forward_backward_no_pipelining, model, 0, state)
    with pytest.raises(ValueError, match="interleaved"):
        _run(forward_backward_pipelining_1f1b, [model, model], 1, state)
    # One-element list is accepted like Megatron's model chunks.
    assert len(_run(forward_backward_pipelining_1f1b, [model], 1, state)) == 1
    pp2 = ParallelState(grid=RankGrid(2, 1, 2, 1, 1), rank=0, groups={"pp": None}, ranks={"pp": [0, 1]})
    with pytest.raises(ValueError, match="forward_backward_pipelining_1f1b"):
        _run(forward_backward_no_pipelining, model, 1, pp2)

    def vector_loss_step(data_iterator, model):
        out, _ = forward_step(data_iterator, model)
        return out, lambda logits: (logits.sum(-1), {})

    tokens, labels = make_data(1)
    with pytest.raises(ValueError, match="scalar loss"):
        forward_backward_no_pipelining(vector_loss_step, micro_batches(tokens, labels), model, 1)


def test_communicator_topology_and_static_shape_check():
    comm = P2PCommunicator(None, [1, 3, 5], 3, TENSOR_SHAPE, torch.float32, torch.device("cpu"))
    assert (comm.prev_rank, comm.next_rank, comm.stage) == (1, 5, 1)
    first = P2PCommunicator(None, [1, 3, 5], 1, TENSOR_SHAPE, torch.float32, torch.device("cpu"))
    assert first.is_first_stage and first.prev_rank is None and first.recv_forward() is None
    first.send_backward(torch.zeros(TENSOR_SHAPE))  # no-op on the first stage: nothing to send to
    last = P2PCommunicator(None, [1, 3, 5], 5, TENSOR_SHAPE, torch.float32, torch.device("cpu"))
    assert last.is_last_stage and last.recv_backward() is None and last.send_forward_recv_backward(None) is None
    # Shape/dtype mismatches fail before anything is posted.
    with pytest.raises(ValueError, match="static shapes"):
        comm.send_forward(torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="torch.float64"):
        comm.send_backward(torch.zeros(TENSOR_SHAPE, dtype=torch.float64))
    with pytest.raises(ValueError, match="not in its pipeline group"):
        P2PCommunicator(None, [0, 2], 1, TENSOR_SHAPE, torch.float32, torch.device("cpu"))
