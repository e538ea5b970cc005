"""--optimizer fusedadamw: the AdamW update through a fused optimizer class with torch.optim's
interface (Intel's FusedAdamW on Gaudi). Contract-tested with torch.optim.AdamW standing in for it
(the documented signature: cls(params, lr=, betas=, eps=, weight_decay=)): the result equals this
repository's AdamW, the state stays in the optimizer's slots, and without a kernel nothing changes."""

from __future__ import annotations

import pytest
import torch

from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.optimizer import optimizer as optimizer_module
from megatron.core.parallel_state import ParallelConfig, ParallelState


class _Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 6).to(dtype)
        self.norm = torch.nn.Parameter(torch.ones(6, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x.to(self.lin.weight.dtype)) * self.norm).float().square().mean()


class _StubDevice:
    def __init__(self, cls) -> None:
        self.cls, self.built = cls, 0

    def fused_adamw(self):
        return self.cls


def _train(dtype: torch.dtype, fused: bool, monkeypatch, steps: int = 3):
    stub = _StubDevice(torch.optim.AdamW)
    monkeypatch.setattr(optimizer_module, "device_of", lambda t: stub)
    net = _Net(dtype)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=dtype == torch.bfloat16, use_fused_adamw=fused)
    opt = build_optimizer([net], config, ParallelState.build(ParallelConfig()))
    for step in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).backward()
        assert opt.step()[0]
    return net, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_class_gives_the_same_update(dtype, monkeypatch):
    net, opt = _train(dtype, True, monkeypatch)
    assert opt.uses_fused_adamw
    plain, plain_opt = _train(dtype, False, monkeypatch)
    assert not plain_opt.uses_fused_adamw
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    for s, t in zip(opt.slots, plain_opt.slots):  # the state is the slots' own tensors
        torch.testing.assert_close(s.exp_avg, t.exp_avg, rtol=0, atol=0)
        torch.testing.assert_close(s.master, t.master, rtol=0, atol=0)
    state = opt.fused.optimizers[0].state
    assert any(v["exp_avg"] is opt.slots[0].exp_avg or v["exp_avg"] is opt.slots[1].exp_avg for v in state.values())


def test_no_kernel_means_the_plain_update(monkeypatch):
    monkeypatch.setattr(optimizer_module, "device_of", lambda t: _StubDevice(None))
    net = _Net(torch.float32)
    opt = build_optimizer([net], OptimizerConfig(use_fused_adamw=True), ParallelState.build(ParallelConfig()))
    assert not opt.uses_fused_adamw
