"""fp32 CPU linear layers through oneDNN (megatron.core.onednn): the same results as torch's ops,
forward and backward, in eager and under torch.compile; used by the model exactly when the flag
says. Also the experts' grouped GEMM handing its weight gradient back in the weight's layout."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from megatron.core import onednn
from megatron.core.device import Device, device_of
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.tensor_parallel import Linear, dense_linear
from megatron.core.transformer.moe.experts import grouped_mm
from tests.unit.core.models.tiny_model import batch, tiny_config

# The official CPU wheels carry oneDNN; a build without it uses torch's ops (tested below too).
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, *tensors: torch.Tensor, grad: torch.Tensor) -> List[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


@needs_onednn
@pytest.mark.parametrize("layout", ["3d", "transposed", "bias", "empty", "wide"])
def test_linear_matches_torch_forward_and_backward(layout: str) -> None:
    """Narrow (out < in) and wide (out > in: the weight gradient's other operand order) layers."""
    torch.manual_seed(0)
    out_features = 56 if layout == "wide" else 24
    w = torch.randn(out_features, 40)
    b = torch.randn(out_features) if layout == "bias" else None
    x = {"3d": torch.randn(3, 7, 40), "transposed": torch.randn(3, 40, 7).transpose(1, 2),
         "bias": torch.randn(5, 40), "empty": torch.randn(0, 40), "wide": torch.randn(2, 9, 40)}[layout]
    grad = torch.randn(*x.shape[:-1], out_features)
    args = (x, w) if b is None else (x, w, b)
    ours = _grads(lambda *t: onednn.linear(*t), *args, grad=grad)
    ref = _grads(lambda *t: F.linear(*t), *args, grad=grad)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, **TOL)
    assert ours[0].shape == ref[0].shape
    assert ours[2].is_contiguous()  # the weight gradient, in the weight's layout


@needs_onednn
def test_linear_is_full_fp32_precision() -> None:
    """Against an fp64 product: fp32-level error (a bf16 / tf32 input rounding would be ~1e-3)."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 4096, dtype=torch.float64), torch.randn(32, 4096, dtype=torch.float64)
    exact = x @ w.t()
    err = (onednn.linear(x.float(), w.float()).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-5


@needs_onednn
def test_linear_output_views_can_be_written_in_place() -> None:
    """MLA rotates a slice of q_b_proj's output in place: views of the op's output must be ordinary
    autograd views (the op returns a fresh tensor, reshaped outside the custom op)."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 8), torch.randn(12, 8)
    grad = torch.randn(2, 5, 12)

    def rotate(linear_fn):
        def fn(x, w):
            q = linear_fn(x, w)
            q[..., 8:] = q[..., 8:].flip(-1) * 2.0
            return q
        return fn

    for got, want in zip(_grads(rotate(onednn.linear), x, w, grad=grad), _grads(rotate(F.linear), x, w, grad=grad)):
        torch.testing.assert_close(got, want, **TOL)


def test_experts_weight_gradient_arrives_in_the_weights_layout() -> None:
    """megatron::grouped_mm computes the stacked weight's gradient as [E, M, K] directly (the
    weight enters transposed), equal to per-group products, and contiguous: no copy on accumulation."""
    torch.manual_seed(0)
    counts = [4, 0, 6, 3]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    a, weight = torch.randn(13, 16), torch.randn(4, 24, 16)  # weight [E, M, K], used as [E, K, M]
    grad = torch.randn(13, 24)
    out, grad_a, grad_w = _grads(lambda x, w: grouped_mm(x, w.transpose(-2, -1), offs), a, weight, grad=grad)
    starts = [0, 4, 4, 10]
    for e, (s, n) in enumerate(zip(starts, counts)):
        torch.testing.assert_close(out[s:s + n], a[s:s + n] @ weight[e].t(), **TOL)
        torch.testing.assert_close(grad_w[e], grad[s:s + n].t() @ a[s:s + n], **TOL)
        torch.testing.assert_close(grad_a[s:s + n], grad[s:s + n] @ weight[e], **TOL)
    assert grad_w.is_contiguous()


def test_device_layer_offers_onednn_only_for_fp32_cpu() -> None:
    x = torch.randn(2, 2)
    assert (device_of(x).onednn_gemm(x) is onednn) == onednn.available()
    assert device_of(x).onednn_gemm(x.bfloat16()) is None  # bf16 GEMMs already go to oneDNN in torch
    for kind in ("cuda", "hpu"):
        assert Device(kind=kind, importer=lambda name: None).onednn_gemm(x) is None
    # Without oneDNN (or with the flag off) dense_linear is F.linear.
    w = torch.randn(3, 2)
    torch.testing.assert_close(dense_linear(x, w, use_onednn=False), F.linear(x, w), rtol=0, atol=0)


@needs_onednn
def test_compiles_without_graph_breaks() -> None:
    """The linear is an opaque custom op with a fake kernel: dynamo traces it whole (fullgraph)."""
    torch._dynamo.reset()
    counters.clear()
    first, second = Linear(16, 8), Linear(8, 4, bias=False)

    def fn(x):
        return second(torch.relu(first(x))).sum()

    x = torch.randn(2, 7, 16)
    params = [first.weight, first.bias, second.weight]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), params)
    want = torch.autograd.grad(fn(x), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert dict(counters["graph_break"]) == {}
    torch._dynamo.reset()


def _gemm_counts(model: DeepSeekModel) -> Dict[str, int]:
    """One forward + backward: oneDNN GEMMs, torch linear ops, and forward calls of nn.Linear modules."""
    from torch.profiler import ProfilerActivity, profile

    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tokens = batch(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        model.loss(out, torch.ones(tokens[:, 1:].shape)).backward()
    for h in hooks:
        h.remove()
    names = [e.name for e in prof.events()]
    return {"onednn": names.count("mkldnn::_linear_pointwise"), "aten_linear": names.count("aten::linear"),
            "linear_calls": calls[0]}


@needs_onednn
def test_model_uses_onednn_exactly_when_the_flag_says() -> None:
    """--use-onednn-linear (KernelConfig.use_onednn_linear): every linear layer of the model runs its
    forward and both backward GEMMs through oneDNN, or none does; the losses agree to rounding."""
    cfg = tiny_config(moe=True)
    off_cfg = dataclasses.replace(cfg, kernels=dataclasses.replace(cfg.kernels, use_onednn_linear=False))
    on, off = _gemm_counts(DeepSeekModel(cfg, seed=1)), _gemm_counts(DeepSeekModel(off_cfg, seed=1))
    assert on["linear_calls"] == off["linear_calls"] > 0
    assert on["onednn"] == 3 * on["linear_calls"] and off["onednn"] == 0
    # The only torch linear left with oneDNN on is each MoE router's fp32 gate ([T, H] x [H, E]).
    moe_layers = cfg.num_layers - cfg.first_k_dense + cfg.mtp.num_layers
    assert on["aten_linear"] == moe_layers and off["aten_linear"] == moe_layers + off["linear_calls"]
    tokens = batch(0)
    losses = []
    for c in (cfg, off_cfg):
        model = DeepSeekModel(c, seed=1)
        losses.append(model.loss(model(tokens[:, :-1], labels=tokens[:, 1:]), torch.ones(tokens[:, 1:].shape)).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
