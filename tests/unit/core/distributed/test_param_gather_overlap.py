"""--overlap-param-gather: after a distributed-optimizer step the parameter all-gathers stay in
flight and each module waits for its own buckets right before its forward; the result equals the
blocking all-gather."""

from __future__ import annotations

import pytest
import torch

from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelConfig, ParallelState
from tests.dist_utils import spawn
from tests.unit.core.models.tiny_model import batch, tiny_config


def _train(overlap: bool):
    state = ParallelState.build(ParallelConfig())
    model = DeepSeekModel(tiny_config(), seed=3)
    ddp = DistributedDataParallel(model, DDPConfig(bucket_size_mb=0.01, use_distributed_optimizer=True,
                                                   overlap_param_gather=overlap), state)
    opt = build_optimizer([ddp], OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), state)
    rank = state.rank_in("dp")
    pending_after_step, pending_after_forward = [], []
    for step in range(2):
        opt.zero_grad()
        tokens = batch(step)[2 * rank : 2 * rank + 2]
        out = ddp(tokens[:, :-1], labels=tokens[:, 1:])
        pending_after_forward.append(sum(b.param_handle is not None for buf in ddp.grad_buffers for b in buf.buckets))
        model.loss(out, torch.ones(2, 8)).backward()
        ddp.finish_grad_sync()
        assert opt.step()[0]
        pending_after_step.append(sum(b.param_handle is not None for buf in ddp.grad_buffers for b in buf.buckets))
    ddp.finish_param_sync()
    return pending_after_step, pending_after_forward, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int):
    torch.set_num_threads(1)
    return _train(True), _train(False)


@pytest.mark.slow
def test_overlapped_param_gather_completes_in_forward_and_matches():
    for (after_step, after_forward, weights), (plain_step, _, plain_weights) in spawn(2, _worker, timeout_s=60):
        assert all(n > 1 for n in after_step), after_step  # several buckets left in flight by the step
        assert after_forward == [0, 0]  # every forward waited for the buckets it used
        assert plain_step == [0, 0]
        for name, tensor in weights.items():
            assert torch.equal(tensor, plain_weights[name]), name
