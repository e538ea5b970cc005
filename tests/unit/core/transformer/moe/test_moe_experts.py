"""GroupedExperts: grouped_mm == per-expert loop == padded bmm, forward and backward."""

from __future__ import annotations

import pytest
import torch

from tests.unit.core.transformer.moe.moe_test_utils import initialized
import torch.nn.functional as F

from megatron.core.transformer.moe import GroupedExperts

E, H, I = 4, 32, 16


def _reference(x: torch.Tensor, counts, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Plain per-expert SwiGLU on the rows of each expert, written out with explicit slices."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        h = x[start:start + n] @ gate_up[e].T
        outs.append((F.silu(h[:, :I]) * h[:, I:]) @ down[e].T)
        start += n
    return torch.cat(outs)


def _experts(use_grouped_gemm: bool, dtype: torch.dtype) -> GroupedExperts:
    torch.manual_seed(0)
    experts = initialized(GroupedExperts(E, H, I, use_grouped_gemm=use_grouped_gemm), std=0.2)
    return experts.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_equals_loop_and_reference(dtype: torch.dtype) -> None:
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    counts = [3, 0, 6, 2]  # an empty expert included
    torch.manual_seed(1)
    x = torch.randn(sum(counts), H, dtype=dtype)
    tpe = torch.tensor(counts)
    grad = torch.randn(sum(counts), H, dtype=dtype)
    results = {}
    for grouped in (True, False):
        experts = _experts(grouped, dtype)
        assert experts._can_use_grouped_mm(x) or not grouped  # the grouped kernel really runs
        xi = x.clone().requires_grad_()
        out = experts(xi, tpe, all_rows_valid=True)
        out.backward(grad)
        results[grouped] = (out, xi.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    ref_experts = _experts(False, dtype)
    xr = x.clone().requires_grad_()
    ref = _reference(xr, counts, ref_experts.gate_up_proj, ref_experts.down_proj)
    ref.backward(grad)
    ref_all = (ref, xr.grad, ref_experts.gate_up_proj.grad, ref_experts.down_proj.grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for got in results.values():
        for a, b in zip(got, ref_all):
            torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float32:  # the grouped kernel and the loop agree to rounding
        for a, b in zip(results[True], results[False]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grouped", [True, False])
def test_tail_rows_are_ignored(grouped: bool) -> None:
    """Rows past sum(tokens_per_expert) give zero output and receive zero gradient."""
    experts = _experts(grouped, torch.float32)
    counts = [2, 1, 0, 3]
    x = torch.randn(9, H).requires_grad_()
    x.data[6:] = float("nan")  # garbage in the dropped tail must not leak anywhere
    out = experts(x, torch.tensor(counts))
    assert torch.equal(out[6:], torch.zeros(3, H))
    out.sum().backward()
    assert torch.equal(x.grad[6:], torch.zeros(3, H))
    assert torch.isfinite(experts.gate_up_proj.grad).all() and torch.isfinite(experts.down_proj.grad).all()
    ref = _reference(x.detach()[:6], counts, experts.gate_up_proj.detach(), experts.down_proj.detach())
    torch.testing.assert_close(out[:6], ref, atol=1e-6, rtol=1e-6)


def test_padded_bmm_equals_grouped() -> None:
    """[E, C, H] with zero padding rows == the grouped path on the real rows, forward and backward."""
    counts, capacity = [3, 0, 4, 1], 4
    torch.manual_seed(3)
    x = torch.randn(sum(counts), H)
    padded = torch.zeros(E, capacity, H)
    start = 0
    for e, n in enumerate(counts):
        padded[e, :n] = x[start:start + n]
        start += n
    grad = torch.randn(sum(counts), H)
    grad_padded = torch.zeros(E, capacity, H)
    start = 0
    for e, n in enumerate(counts):
        grad_padded[e, :n] = grad[start:start + n]
        start += n

    grouped = _experts(True, torch.float32)
    xg = x.clone().requires_grad_()
    out_g = grouped(xg, torch.tensor(counts), all_rows_valid=True)
    out_g.backward(grad)

    bmm = _experts(True, torch.float32)
    xp = padded.clone().requires_grad_()
    out_p = bmm.forward_padded(xp)
    out_p.backward(grad_padded)
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(out_p[e, :n], out_g[start:start + n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(xp.grad[e, :n], xg.grad[start:start + n], atol=1e-6, rtol=1e-6)
        assert torch.equal(out_p[e, n:], torch.zeros(capacity - n, H))  # zero padding rows stay zero
        start += n
    torch.testing.assert_close(bmm.gate_up_proj.grad, grouped.gate_up_proj.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bmm.down_proj.grad, grouped.down_proj.grad, atol=1e-6, rtol=1e-6)


def test_misaligned_sizes_fall_back_to_loop() -> None:
    """grouped_mm's CPU backward needs 16-byte strides; odd widths must take the loop instead."""
    experts = initialized(GroupedExperts(2, 12, 6, use_grouped_gemm=True))
    x = torch.randn(5, 12, requires_grad=True)
    assert not experts._can_use_grouped_mm(x.detach())
    experts(x, torch.tensor([2, 3]), all_rows_valid=True).sum().backward()
    assert x.grad is not None


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError):
        initialized(GroupedExperts(0, H, I))
    experts = initialized(GroupedExperts(E, H, I))
    with pytest.raises(ValueError):
        experts(torch.randn(3, H), torch.tensor([3]))
    with pytest.raises(ValueError):
        experts.forward_padded(torch.randn(E + 1, 2, H))


@pytest.mark.parametrize("all_rows_valid", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
def test_backward_accepts_expanded_gradient(grouped: bool, all_rows_valid: bool) -> None:
    """experts(x).sum().backward() hands backward an expanded (zero-stride) gradient, which
    grouped_mm's backward rejected ("Invalid strides/sizes"); it must give the reference gradients."""
    experts = _experts(grouped, torch.float32)
    counts = [3, 0, 4, 1]
    x = torch.randn(8, H, requires_grad=True)
    experts(x, torch.tensor(counts), all_rows_valid=all_rows_valid).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    gate_up = experts.gate_up_proj.detach().clone().requires_grad_(True)
    down = experts.down_proj.detach().clone().requires_grad_(True)
    _reference(x_ref, counts, gate_up, down).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(experts.gate_up_proj.grad, gate_up.grad)
    torch.testing.assert_close(experts.down_proj.grad, down.grad)
