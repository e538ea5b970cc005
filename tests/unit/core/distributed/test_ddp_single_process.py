"""DistributedDataParallel without processes (DP = 1): layout, accumulation, hooks, passthrough, config."""

import pytest
import torch
from torch import nn

from megatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads, unwrap_model
from megatron.core.distributed.grad_buffer import ALIGN
from megatron.core.parallel_state import ParallelConfig, ParallelState


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(5, 7).to(dtype)
        self.norm = nn.Parameter(torch.ones(7, dtype=dtype))
        self.fc2 = nn.Linear(7, 3).to(dtype)
        self.expert = nn.Parameter(torch.randn(3, 5, dtype=dtype) * 0.1)
        self.expert.is_expert = True
        self.frozen = nn.Parameter(torch.ones(2, dtype=dtype), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.norm) + x @ self.expert.t()


def state():
    return ParallelState.build(ParallelConfig())


def loss_of(model, x):
    return model(x).square().mean()


def test_layout_buckets_views_and_passthrough():
    torch.manual_seed(0)
    net = Net()
    names_before = [n for n, _ in net.named_parameters()]
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    ddp = DistributedDataParallel(net, DDPConfig(bucket_size_mb=1e-4), state())  # ~26 fp32 elements per bucket
    assert [n for n, _ in ddp.named_parameters()] == names_before
    assert list(ddp.state_dict()) == list(net.state_dict())
    assert unwrap_model(ddp) is net and ddp.fc1 is net.fc1
    dense, expert = ddp.grad_buffers  # frozen params get no buffer
    assert not dense.is_expert and expert.is_expert and expert.params[0] is net.expert
    # Reverse registration order, 64-aligned starts, several buckets, main_grad views of the buffer.
    order = [p for p in reversed(list(net.parameters())) if p.requires_grad and p is not net.expert]
    assert [id(p) for p in dense.params] == [id(p) for p in order]
    assert len(dense.buckets) == 3
    for p, (s, e) in dense.ranges.items():
        assert s % ALIGN == 0 and e - s == p.numel()
        assert p.main_grad.data_ptr() == dense.grad_data[s:].data_ptr() and p.main_grad.shape == p.shape
    assert dense.param_data is None
    for n, p in net.named_parameters():
        assert torch.equal(p, values[n])
    out = ddp(torch.randn(4, 5))
    assert out.shape == (4, 3)


def test_accumulation_no_sync_and_zero():
    torch.manual_seed(1)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    ddp = DistributedDataParallel(net, DDPConfig(bucket_size_mb=None), state())
    xs = [torch.randn(4, 5) for _ in range(3)]
    with ddp.no_sync():
        for x in xs[:2]:
            loss_of(ddp, x).backward()
    loss_of(ddp, xs[2]).backward()
    for x in xs:
        loss_of(ref, x).backward()
    finalize_model_grads([ddp], ddp.parallel_state)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert p.grad is None, n
            torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-6, atol=1e-7)
    ddp.zero_grad_buffer()
    assert all(float(b.grad_data.abs().sum()) == 0 for b in ddp.grad_buffers)


def test_overlap_launches_from_hooks_and_rejects_late_grads():
    torch.manual_seed(2)
    ddp = DistributedDataParallel(Net(), DDPConfig(bucket_size_mb=1e-4, overlap_grad_reduce=True), state())
    x = torch.randn(4, 5)
    with ddp.no_sync():
        loss_of(ddp, x).backward()
    assert not any(b.launched for buf in ddp.grad_buffers for b in buf.buckets), "no_sync must not launch"
    loss_of(ddp, x).backward()
    assert all(b.launched for buf in ddp.grad_buffers for b in buf.buckets), "every bucket full -> launched"
    with pytest.raises(RuntimeError, match="arrived after"):
        loss_of(ddp, x).backward()
    ddp.zero_grad_buffer()
    assert not any(b.launched for buf in ddp.grad_buffers for b in buf.buckets)
    ddp.finish_grad_sync()


def test_deferred_buffers_are_not_launched_by_hooks():
    torch.manual_seed(3)
    net = Net()
    net.norm.sequence_parallel = True  # summed over TP after the DP reduction: not deferred
    net.fc1.weight.shared_embedding = True
    ddp = DistributedDataParallel(net, DDPConfig(overlap_grad_reduce=True), state())
    deferred = [b for b in ddp.grad_buffers if b.deferred]
    assert len(deferred) == 1 and deferred[0].params == [net.fc1.weight]
    assert not ddp.param_to_buffer[net.norm].deferred
    loss_of(ddp, torch.randn(4, 5)).backward()
    assert not any(b.launched for b in deferred[0].buckets)
    assert all(b.launched for buf in ddp.grad_buffers if not buf.deferred for b in buf.buckets)
    ddp.finish_grad_sync()
    assert all(b.launched for b in deferred[0].buckets)


def test_distributed_optimizer_param_buffer_and_bf16_fp32_grads():
    torch.manual_seed(4)
    net = Net(torch.bfloat16)
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    ddp = DistributedDataParallel(
        net, DDPConfig(bucket_size_mb=1e-4, use_distributed_optimizer=True, grad_reduce_in_fp32=True), state()
    )
    for buf in ddp.grad_buffers:
        assert buf.param_data is not None and buf.param_data.dtype == torch.bfloat16
        assert buf.grad_data.dtype == torch.float32
        for b in buf.buckets:
            assert (b.end - b.start) % ALIGN == 0
        for p, (s, e) in buf.ranges.items():
            assert p.data_ptr() == buf.param_data[s:].data_ptr()
        pieces = buf.local_shards()
        assert [(p, lo, hi) for p, _, _, lo, hi in pieces] == [(p, 0, p.numel()) for p in buf.params]
    for n, p in net.named_parameters():
        assert torch.equal(p, values[n]), n
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    loss_of(ddp, x).backward()
    ref = Net(torch.bfloat16)
    ref.load_state_dict(values)
    loss_of(ref, x).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        if p.requires_grad:
            assert p.main_grad.dtype == torch.float32 and torch.equal(p.main_grad, q.grad.float())


def test_config_validation():
    with pytest.raises(ValueError, match="bucket_size_mb"):
        DDPConfig(bucket_size_mb=0)
