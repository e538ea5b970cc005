"""RMSNorm against HF's DeepseekV3RMSNorm, and its fused-kernel branch with a stand-in HPU kernel."""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from megatron.core.device import Device
from megatron.core.transformer.rmsnorm import RMSNorm, rms_norm


def _pair(hidden, eps, dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(hidden, eps), DeepseekV3RMSNorm(hidden, eps=eps)
    weight = torch.randn(hidden) * 0.5 + 1.0
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
    return ours.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_forward_and_backward(dtype):
    ours, ref = _pair(48, 1e-6, dtype)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert y1.dtype == y2.dtype == dtype
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # same arithmetic, bit for bit
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=0)


def test_fp32_weight_with_bf16_input_promotes_like_hf():
    ours, ref = _pair(16, 1e-5, torch.float32)
    x = torch.randn(3, 16).to(torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert ours(x).dtype == torch.float32


class RecordingFusedRMSNorm:
    def __init__(self):
        self.calls = []

    def apply(self, x, weight, eps):
        self.calls.append((tuple(x.shape), eps))
        return rms_norm(x, weight, eps)


def _fake_hpu(kernel):
    modules = {"habana_frameworks.torch.hpex.normalization": SimpleNamespace(FusedRMSNorm=kernel)}
    return Device(kind="hpu", importer=modules.get)


def test_fused_kernel_used_on_hpu_with_3d_input():
    kernel = RecordingFusedRMSNorm()
    norm = RMSNorm(8, 1e-6, use_fused=True, device=_fake_hpu(kernel))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-6))
    y = norm(torch.randn(4, 8))  # 2-D input folded into [1, 4, 8]
    assert y.shape == (4, 8)
    assert kernel.calls == [((2, 3, 8), 1e-6), ((1, 4, 8), 1e-6)]


def test_fused_disabled_or_missing_falls_back():
    kernel = RecordingFusedRMSNorm()
    x = torch.randn(2, 3, 8)
    RMSNorm(8, use_fused=False, device=_fake_hpu(kernel))(x)
    assert kernel.calls == []
    no_kernel = Device(kind="hpu", importer=lambda name: None)
    torch.testing.assert_close(RMSNorm(8, device=no_kernel)(x), rms_norm(x, torch.ones(8), 1e-6))


def test_bad_arguments():
    with pytest.raises(ValueError):
        RMSNorm(0)
    with pytest.raises(ValueError):
        RMSNorm(4, eps=0.0)
