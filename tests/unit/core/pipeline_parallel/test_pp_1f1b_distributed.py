"""1F1B over real gloo pipeline groups equals the single-process run of the whole model.

One spawned group of 4 ranks checks two layouts: PP4 (first, middle and last stages) and PP2 x DP2
(pipeline groups [0, 2] and [1, 3]: peers are not adjacent global ranks). Every rank builds the
full toy model and its one-big-batch reference locally, runs its stage under the schedule, and
compares its loss and every gradient (relative error of the norm < 1e-6, fp32).
"""

import contextlib

import pytest
import torch

from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.pipeline_parallel import forward_backward_pipelining_1f1b, get_forward_backward_func, stage_layer_ranges
from tests.unit.core.pipeline_parallel.pp_toy_model import (
    TENSOR_SHAPE,
    build_full,
    forward_step,
    full_name,
    make_data,
    micro_batches,
    reference,
    rel_err,
    split_stage,
)
from tests.dist_utils import spawn

TOL = 1e-6
# (num_layers, first_stage_layers, last_stage_layers, num_microbatches, aux_coeff)
CASES = {
    4: [(4, None, None, 1, 0.0), (4, None, None, 2, 0.0), (4, None, None, 5, 0.0), (7, 1, None, 4, 0.0), (6, 2, 2, 3, 0.3)],
    2: [(4, None, None, m, 0.0) for m in (1, 2, 4)] + [(4, 1, None, m, 0.0) for m in (1, 2, 4)] + [(5, None, 2, 3, 0.3)],
}


class CountingDevice:
    def __init__(self):
        self.steps = 0

    def mark_step(self):
        self.steps += 1


def _check_training(state, case):
    num_layers, first, last, m, aux = case
    pp = state.size("pp")
    stage = state.rank_in("pp")
    ranges = stage_layer_ranges(num_layers, pp, first, last)
    full = build_full(num_layers, aux)
    part = split_stage(full, ranges, stage)
    tokens, labels = make_data(m)
    ref_loss, ref_grads = reference(full, tokens, labels)

    in_no_sync = {"on": False}
    events = []

    @contextlib.contextmanager
    def no_sync():
        events.append("enter")
        in_no_sync["on"] = True
        yield
        in_no_sync["on"] = False
        events.append("exit")

    part.layers[0].weight.register_hook(lambda g: events.append("no-sync" if in_no_sync["on"] else "sync"))
    device = CountingDevice()
    schedule = get_forward_backward_func(pp)
    reported = schedule(
        forward_step, micro_batches(tokens, labels), part, m, TENSOR_SHAPE, torch.float32, state,
        device=device, grad_sync_context=no_sync, aux_loss_scale_func=part.set_aux_scale,
    )
    failures = []
    tag = f"PP{pp} stage {stage} case {case}"
    if state.is_last_stage:
        loss = torch.stack([r["lm loss"] for r in reported]).mean() if len(reported) == m else None
        if loss is None or rel_err(loss, ref_loss) > TOL:
            failures.append(f"{tag}: loss {loss} != {ref_loss}")
    elif reported:
        failures.append(f"{tag}: non-last stage reported {reported}")
    for name, p in part.named_parameters():
        err = rel_err(p.grad, ref_grads[full_name(name, ranges[stage][0])]) if p.grad is not None else float("inf")
        if err > TOL:
            failures.append(f"{tag}: grad {name} rel err {err}")
    if device.steps != 2 * m:
        failures.append(f"{tag}: mark_step called {device.steps} times")
    if events != ["enter"] + ["no-sync"] * (m - 1) + ["exit", "sync"]:
        failures.append(f"{tag}: grad sync events {events}")
    return failures


def _check_forward_only(state, m):
    pp = state.size("pp")
    stage = state.rank_in("pp")
    ranges = stage_layer_ranges(4, pp)
    full = build_full(4, aux_coeff=0.3)
    part = split_stage(full, ranges, stage)
    tokens, labels = make_data(m)
    device = CountingDevice()
    reported = forward_backward_pipelining_1f1b(
        forward_step, micro_batches(tokens, labels), part, m, TENSOR_SHAPE, torch.float32, state,
        forward_only=True, device=device,
    )
    tag = f"PP{pp} stage {stage} forward_only"
    failures = []
    if state.is_last_stage:
        expected = [reference(full, t, l)[0] for t, l in zip(tokens.split(2), labels.split(2))]
        if len(reported) != m or any(rel_err(r["lm loss"], e) > TOL for r, e in zip(reported, expected)):
            failures.append(f"{tag}: losses {reported} != {expected}")
    if any(p.grad is not None for p in part.parameters()):
        failures.append(f"{tag}: gradients were computed")
    if device.steps != m:
        failures.append(f"{tag}: mark_step called {device.steps} times")
    return failures


def _worker(rank, world):
    failures = []
    for pp in (4, 2):
        # Failures are recorded, not raised, so every rank keeps posting the same transfers.
        state = ParallelState.build(ParallelConfig(pipeline_model_parallel_size=pp))
        for case in CASES[pp]:
            failures += _check_training(state, case)
        failures += _check_forward_only(state, 3)
    return failures


@pytest.mark.slow
def test_1f1b_pp4_and_pp2_dp2_match_single_process():
    world = 4
    # A short timeout turns a schedule deadlock into an error instead of a hung test.
    results = spawn(world, _worker, timeout_s=60)
    assert [rank for rank, r in enumerate(results) if r is not None] == list(range(world))
    failures = [f for rank in range(world) for f in results[rank]]
    assert not failures, "\n".join(failures)
