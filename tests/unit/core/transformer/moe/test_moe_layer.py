"""Whole MoELayer vs HF's DeepseekV3MoE / DeepseekV2Moe with copied weights: output and gradients (fp32)."""

from __future__ import annotations

import pytest
import torch
from tests.unit.core.transformer.moe.moe_test_utils import copy_to_hf, hf_grads_in_our_layout, hf_v2_moe, hf_v3_moe, rel_err, tiny_config, initialized

from megatron.core.transformer.moe import MoELayer, MoEStats

OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def _compare(layer: MoELayer, hf: torch.nn.Module, x: torch.Tensor) -> dict:
    copy_to_hf(layer, hf)
    grad_out = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    out = layer(x1)
    out.backward(grad_out)
    x2 = x.clone().requires_grad_()
    ref = hf(x2)
    ref.backward(grad_out)
    errors = {"output": rel_err(out, ref), "input": rel_err(x1.grad, x2.grad)}
    ours = dict(layer.named_parameters())
    for name, g in hf_grads_in_our_layout(hf).items():
        errors[name] = rel_err(ours[name].grad, g)
    assert errors["output"] <= OUT_TOL, errors
    assert all(v <= GRAD_TOL for k, v in errors.items() if k != "output"), errors
    return errors


def _randomise(layer: MoELayer, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, std)


@pytest.mark.parametrize("grouped", [True, False])
def test_v3_layer_matches_hf(grouped: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(
        use_grouped_gemm=grouped, num_experts=8, topk=3, num_groups=4, group_topk=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, enable_expert_bias=True, num_shared_experts=1,
    )
    layer = initialized(MoELayer(cfg, 0))
    _randomise(layer)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.1, -0.05, 0.0, 0.2, -0.1, 0.05, -0.2, 0.15]))
    x = torch.randn(2, 9, 32)
    _compare(layer, hf_v3_moe(cfg), x)
    stats = layer.last_stats
    assert isinstance(stats, MoEStats)
    assert int(stats.tokens_per_expert.sum()) == 18 * 3 and float(stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_v2_layer_matches_hf(groups) -> None:
    torch.manual_seed(1)
    cfg = tiny_config(
        num_experts=8, topk=3, score_function="softmax", num_groups=groups[0], group_topk=groups[1],
        routed_scaling_factor=1.5, norm_topk_prob=False, num_shared_experts=2,
    )
    layer = initialized(MoELayer(cfg, 0))
    _randomise(layer)
    _compare(layer, hf_v2_moe(cfg), torch.randn(3, 5, 32))


def test_bf16_layer_runs_close_to_fp32() -> None:
    torch.manual_seed(2)
    cfg = tiny_config(num_groups=4, group_topk=2, enable_expert_bias=True, routed_scaling_factor=2.5)
    layer = initialized(MoELayer(cfg, 0))
    _randomise(layer, 0.1)
    x = torch.randn(2, 8, 32)
    ref = layer(x)
    layer_bf16 = initialized(MoELayer(cfg, 0)).to(torch.bfloat16)
    layer_bf16.load_state_dict(layer.state_dict())
    xb = x.to(torch.bfloat16).requires_grad_()
    out = layer_bf16(xb)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer_bf16.router.expert_bias.dtype == torch.float32
    assert rel_err(out.float(), ref) < 3e-2
    assert torch.isfinite(layer_bf16.experts.gate_up_proj.grad.float()).all()


def test_dense_layer_index_is_rejected() -> None:
    cfg = tiny_config().__class__(
        vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2, first_k_dense=1, moe=tiny_config().moe
    )
    with pytest.raises(ValueError):
        initialized(MoELayer(cfg, 0))
    initialized(MoELayer(cfg, 1))
    with pytest.raises(ValueError):
        initialized(MoELayer(cfg, 1))(torch.randn(4, 32))


def test_fused_kernel_path_gives_the_layer_output_and_gradients(monkeypatch):
    """Where the device's MoE kernel applies (dropless, one EP rank), the layer hands routing to
    GroupedExperts.forward_routed; its result and gradients equal the dispatcher path."""
    from megatron.core.transformer.moe import moe_layer

    cfg = tiny_config(load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    results = []
    for fused in (False, True):
        monkeypatch.setattr(moe_layer, "fused_moe_supported", lambda **kw: fused)
        layer = initialized(MoELayer(cfg, 0), seed=3)
        calls = []
        real = layer.experts.forward_routed
        layer.experts.forward_routed = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        xi = x.clone().requires_grad_()
        out = layer(xi, mask)
        out.sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
        assert bool(calls) == fused
    (out_a, gx_a, g_a), (out_b, gx_b, g_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-6)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-6, msg=name)
