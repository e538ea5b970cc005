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

    def fused_clip_norm(self):
        return None


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


class _StandInClipNorm:
    """Intel's FusedClipNorm interface: FusedClipNorm(parameters, max_norm).clip_norm(parameters)
    clips every `.grad` in place and returns the total L2 norm before clipping."""

    calls = 0

    def __init__(self, parameters, max_norm: float) -> None:
        self.max_norm = max_norm

    def clip_norm(self, parameters):
        _StandInClipNorm.calls += 1
        grads = [p.grad for p in parameters]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        coeff = self.max_norm / (float(total) + 1e-6)
        if coeff < 1.0:
            for g in grads:
                g.mul_(coeff)
        return total


class _ClipDevice:
    def fused_adamw(self):
        return None

    def fused_clip_norm(self):
        return _StandInClipNorm


def test_fused_clip_norm_is_used_where_the_local_norm_is_global(monkeypatch):
    """One rank holding the whole model: the fused kernel clips; the result equals the plain path."""
    results = {}
    for name, device in (("fused", _ClipDevice()), ("plain", _StubDevice(None))):
        monkeypatch.setattr(optimizer_module, "device_of", lambda t, device=device: device)
        net = _Net(torch.float32)
        opt = build_optimizer([net], OptimizerConfig(lr=1e-2, clip_grad=0.01), ParallelState.build(ParallelConfig()))
        net(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).backward()
        ok, norm, _ = opt.step()
        results[name] = (norm, [p.detach().clone() for p in net.parameters()])
    assert _StandInClipNorm.calls == 1
    assert results["fused"][0] == pytest.approx(results["plain"][0], rel=1e-6) and results["plain"][0] > 0.01
    for a, b in zip(results["fused"][1], results["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
