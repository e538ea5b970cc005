"""GroupedExperts without a grouped kernel (sync-free tiles), the routed entry point, and Gaudi's
fused MoE kernel against a stand-in with Intel's documented signature."""

from __future__ import annotations

from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F

from megatron.core.device import Device
from megatron.core.transformer.moe import GroupedExperts
from megatron.core.transformer.moe.experts import expert_tiles, fused_moe_supported
from tests.unit.core.transformer.moe.moe_test_utils import initialized

E, H, I = 4, 32, 16


def _experts(seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    return initialized(GroupedExperts(E, H, I), std=0.2)


def _expert(experts: GroupedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ experts.gate_up_proj[e].T
    return (F.silu(h[:, :I]) * h[:, I:]) @ experts.down_proj[e].T


def _reference(experts: GroupedExperts, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(_expert(experts, e, x[start : start + n]))
        start += n
    outs.append(torch.zeros(x.shape[0] - start, H))
    return torch.cat(outs)


@pytest.mark.parametrize("counts, rows", [([3, 0, 6, 2], 11), ([0, 0, 9, 0], 12), ([1, 1, 1, 1], 4), ([0, 0, 0, 0], 3)])
def test_expert_tiles_cover_each_counted_row_once(counts: List[int], rows: int) -> None:
    expert, tile_rows, valid = expert_tiles(torch.tensor(counts), rows)
    block = max(1, -(-rows // E))
    assert tile_rows.shape == valid.shape == (-(-rows // block) + E, block)  # static: depends on (N, E) only
    seen = sorted(tile_rows[valid].tolist())
    assert seen == list(range(sum(counts)))
    starts = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)
    for t in range(tile_rows.shape[0]):
        e = int(expert[t])
        for r in tile_rows[t][valid[t]].tolist():
            assert starts[e] <= r < starts[e] + counts[e]  # every valid slot belongs to its tile's expert


@pytest.mark.parametrize("counts, tail", [([3, 0, 6, 2], 0), ([2, 1, 0, 3], 3)])
def test_tiled_fallback_matches_per_expert_reference(counts: List[int], tail: int) -> None:
    experts = _experts()
    ref_experts = _experts()
    torch.manual_seed(1)
    x = torch.randn(sum(counts) + tail, H)
    grad = torch.randn_like(x)
    xt = x.clone().requires_grad_()
    out = experts._tiled_forward(xt, torch.tensor(counts))
    out.backward(grad)
    xr = x.clone().requires_grad_()
    ref = _reference(ref_experts, xr, counts)
    ref.backward(grad)
    for got, want in ((out, ref), (xt.grad, xr.grad), (experts.gate_up_proj.grad, ref_experts.gate_up_proj.grad),
                      (experts.down_proj.grad, ref_experts.down_proj.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[sum(counts):], torch.zeros(tail, H))


def test_tiled_fallback_runs_under_fullgraph_compile() -> None:
    """No host read anywhere: dynamo captures forward and backward in one graph (fullgraph)."""
    experts = _experts()
    counts = torch.tensor([2, 0, 5, 1])
    x = torch.randn(8, H, requires_grad=True)

    def step(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return experts._tiled_forward(x, counts)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(x, counts)
    out.sum().backward()
    torch.testing.assert_close(out, _reference(experts, x.detach(), [2, 0, 5, 1]), atol=1e-5, rtol=1e-5)


def _routing(num_tokens: int, topk: int, num_experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, topk, generator=g)
    return indices, weights


def _routed_reference(experts: GroupedExperts, x, indices, weights, offset: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j]) - offset
            if 0 <= e < E:
                out[t] += weights[t, j] * _expert(experts, e, x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("offset", [0, 4])
def test_forward_routed_fallback_is_the_routed_sum(offset: int) -> None:
    """Eight global experts, this module holding four of them from `offset`: other experts add nothing."""
    experts = _experts()
    indices, weights = _routing(7, 3, 8, seed=offset)
    x = torch.randn(7, H)
    out = experts.forward_routed(x, indices, weights, expert_offset=offset)
    torch.testing.assert_close(out, _routed_reference(experts, x, indices, weights, offset), atol=1e-5, rtol=1e-5)


class StandInMoE:
    """Intel's torch.ops.hpu.mixture_of_experts (fused-weights overload), keywords as documented;
    computes the kernel's contract: sum_j router_weights[t, j] * expert(routing[t, j])(x[t]) over
    experts_min <= id <= experts_max, with w12[i] = [gate; up] [2I, H] and w3[i] = down [H, I]."""

    def __init__(self) -> None:
        self.calls: List[dict] = []

    def __call__(self, *, hidden_states, expert_routing_table, router_weights, w12, w3, permuted_weights,
                 activation, experts_min, experts_max):
        self.calls.append(dict(permuted_weights=permuted_weights, activation=activation, experts_min=experts_min,
                               experts_max=experts_max, num_weights=(len(w12), len(w3)),
                               weights_dtype=router_weights.dtype))
        assert permuted_weights and activation == "silu" and len(w12) == len(w3) == experts_max - experts_min + 1
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(expert_routing_table.shape[1]):
                e = int(expert_routing_table[t, j])
                if experts_min <= e <= experts_max:
                    gate, up = (hidden_states[t] @ w12[e - experts_min].T).chunk(2)
                    out[t] += router_weights[t, j] * ((F.silu(gate) * up) @ w3[e - experts_min].T)
        return out


def _fake_hpu(op) -> Device:
    modules = {"habana_frameworks.torch.core": SimpleNamespace()}
    device = Device(kind="hpu", importer=modules.get)
    device.fused_moe = lambda: op  # type: ignore[method-assign]  # torch.ops.hpu is absent on CPU
    return device


def test_forward_routed_calls_the_fused_kernel_with_intel_layout() -> None:
    experts = _experts()
    kernel = StandInMoE()
    indices, weights = _routing(5, 2, 8, seed=3)
    x = torch.randn(5, H)
    out = experts.forward_routed(x, indices, weights, expert_offset=4, device=_fake_hpu(kernel))
    assert kernel.calls == [dict(permuted_weights=True, activation="silu", experts_min=4, experts_max=7,
                                 num_weights=(E, E), weights_dtype=x.dtype)]
    torch.testing.assert_close(out, experts.forward_routed(x, indices, weights, expert_offset=4), atol=1e-5, rtol=1e-5)


def test_device_fused_moe_accessor_is_hpu_only() -> None:
    assert Device(kind="cpu").fused_moe() is None
    assert Device(kind="hpu", importer=lambda name: None).fused_moe() is None  # stack missing


def test_fused_moe_supported_only_where_semantics_match() -> None:
    kernel_device = _fake_hpu(StandInMoE())
    ok = dict(device=kernel_device, capacity_factor=None, has_token_mask=False, dispatcher="alltoall", ep_size=1)
    assert fused_moe_supported(**ok)
    assert not fused_moe_supported(**{**ok, "capacity_factor": 1.25})  # the kernel cannot drop
    assert not fused_moe_supported(**{**ok, "has_token_mask": True})
    assert not fused_moe_supported(**{**ok, "ep_size": 2})  # all-to-all exchanges only routed rows
    assert fused_moe_supported(**{**ok, "ep_size": 2, "dispatcher": "allgather"})
    assert not fused_moe_supported(**{**ok, "device": Device(kind="cpu")})
