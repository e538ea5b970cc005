"""Token dispatch: permutation, capacity drop (both policies, padding) against explicit-loop references,
and proof that the static paths never synchronise with the host."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from tests.unit.core.transformer.moe.moe_test_utils import tiny_config, initialized
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core.transformer.moe import GroupedExperts, MoELayer, TokenDispatcher, expert_capacity

E, K, H, I = 4, 2, 32, 16


def _expert_fn(experts: GroupedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ experts.gate_up_proj[e].T
    return (F.silu(h[..., :I]) * h[..., I:]) @ experts.down_proj[e].T


def _reference_keep(probs, indices, capacity: Optional[int], policy: str, mask=None) -> List[List[bool]]:
    """Explicit loops: per expert, list its assignments of real tokens, order them by the policy, keep `capacity`."""
    num_tokens, k = indices.shape
    keep = [[False] * k for _ in range(num_tokens)]
    for e in range(E):
        cands = [
            (t, j) for t in range(num_tokens) for j in range(k)
            if int(indices[t, j]) == e and (mask is None or bool(mask[t]))
        ]
        if policy == "probs":
            cands.sort(key=lambda tj: -float(probs[tj[0], tj[1]]))
        for t, j in cands if capacity is None else cands[:capacity]:
            keep[t][j] = True
    return keep


def _reference_output(experts, hidden, probs, indices, keep) -> torch.Tensor:
    rows = []
    for t in range(hidden.shape[0]):
        acc = torch.zeros(H)
        for j in range(indices.shape[1]):
            if keep[t][j]:
                acc = acc + probs[t, j] * _expert_fn(experts, int(indices[t, j]), hidden[t])
        rows.append(acc)
    return torch.stack(rows)


def _routing(num_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, H, generator=gen)
    # Skewed choices so some experts overflow; random weights (no ties).
    logits = torch.randn(num_tokens, E, generator=gen) + torch.tensor([2.0, 1.0, 0.0, -1.0])
    indices = logits.topk(K, dim=-1).indices
    probs = torch.rand(num_tokens, K, generator=gen) + 0.1
    return hidden, probs, indices


def _run(dispatcher: TokenDispatcher, experts: GroupedExperts, hidden, probs, indices, mask=None):
    rows, plan = dispatcher.dispatch_preprocess(hidden, probs, indices, mask)
    rows = dispatcher.dispatch(rows, plan)
    if plan.padded:
        out = experts.forward_padded(rows.view(E, plan.capacity, H)).reshape(-1, H)
    else:
        out = experts(rows, plan.tokens_per_expert, all_rows_valid=plan.all_rows_valid)
    return rows, plan, dispatcher.combine_postprocess(dispatcher.combine(out, plan), plan)


def test_capacity_formula() -> None:
    assert expert_capacity(12, 2, 4, None) is None
    assert expert_capacity(12, 2, 4, 0.5) == 3  # ceil(12 * 2 / 4 * 0.5)
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(7, 3, 8, 1.25) == 4  # ceil(3.28125)


def test_dropless_permutation_and_combine() -> None:
    torch.manual_seed(0)
    experts = initialized(GroupedExperts(E, H, I), std=0.2)
    hidden, probs, indices = _routing(10, seed=1)
    dispatcher = TokenDispatcher(E, K)
    rows, plan, out = _run(dispatcher, experts, hidden, probs, indices)
    assert rows.shape == (10 * K, H) and plan.all_rows_valid and plan.keep is None
    assert plan.tokens_per_expert.tolist() == [int((indices == e).sum()) for e in range(E)]
    expected_rows = [hidden[t] for e in range(E) for t in range(10) for j in range(K) if int(indices[t, j]) == e]
    assert torch.equal(rows, torch.stack(expected_rows))  # grouped by expert, token order inside
    keep = _reference_keep(probs, indices, None, "probs")
    torch.testing.assert_close(out, _reference_output(experts, hidden, probs, indices, keep), atol=1e-6, rtol=1e-5)
    assert float(plan.dropped_fraction) == 0.0


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("num_tokens,factor", [(12, 0.5), (3, 4.0)])  # second: capacity 6 > T = 3
def test_capacity_drop_matches_loop_reference(policy: str, pad: bool, num_tokens: int, factor: float) -> None:
    torch.manual_seed(0)
    experts = initialized(GroupedExperts(E, H, I), std=0.2)
    hidden, probs, indices = _routing(num_tokens, seed=2)
    hidden.requires_grad_()
    probs.requires_grad_()
    dispatcher = TokenDispatcher(E, K, capacity_factor=factor, pad_to_capacity=pad, drop_policy=policy)
    capacity = math.ceil(num_tokens * K / E * factor)
    rows, plan, out = _run(dispatcher, experts, hidden, probs, indices)

    keep = _reference_keep(probs.detach(), indices, capacity, policy)
    assert plan.capacity == capacity
    assert plan.keep.tolist() == keep
    kept_per_expert = [sum(keep[t][j] for t in range(num_tokens) for j in range(K) if int(indices[t, j]) == e)
                       for e in range(E)]
    assert plan.tokens_per_expert.tolist() == kept_per_expert
    assert max(kept_per_expert) <= capacity
    n_kept = sum(map(sum, keep))
    assert abs(float(plan.dropped_fraction) - (1 - n_kept / (num_tokens * K))) < 1e-6
    if num_tokens == 12:
        assert n_kept < num_tokens * K  # the example really drops
    assert rows.shape == ((E * capacity, H) if pad else (num_tokens * K, H))

    ref = _reference_output(experts, hidden, probs, indices, keep)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (hidden, probs, experts.gate_up_proj), grad)
    want = torch.autograd.grad(ref, (hidden, probs, experts.gate_up_proj), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Dropped assignments get exactly zero gradient on their routing weight.
    dropped = ~torch.tensor(keep)
    assert torch.equal(got[1][dropped], torch.zeros(int(dropped.sum())))


@pytest.mark.parametrize("pad", [False, True])
def test_padding_tokens_take_no_capacity(pad: bool) -> None:
    torch.manual_seed(0)
    experts = initialized(GroupedExperts(E, H, I), std=0.2)
    hidden, probs, indices = _routing(12, seed=3)
    mask = torch.tensor([True, False] * 6)
    factor = 0.5 if pad else None  # dropless with a mask still drops the padding tokens
    dispatcher = TokenDispatcher(E, K, capacity_factor=factor, pad_to_capacity=pad, drop_policy="position")
    _, plan, out = _run(dispatcher, experts, hidden, probs, indices, mask)
    keep = _reference_keep(probs, indices, None if factor is None else 3, "position", mask)
    assert plan.keep.tolist() == keep
    assert torch.equal(out[~mask], torch.zeros(6, H))
    torch.testing.assert_close(out, _reference_output(experts, hidden, probs, indices, keep), atol=1e-6, rtol=1e-5)
    n_kept = sum(map(sum, keep))
    assert abs(float(plan.dropped_fraction) - (1 - n_kept / (6 * K))) < 1e-6


# ---- no host synchronisation ------------------------------------------------------------------
# Device -> host reads all funnel through a few aten ops: `_local_scalar_dense` (.item(), bool(),
# int(), float()), and ops whose output size depends on data (nonzero, boolean indexing,
# masked_select, unique, bincount and repeat_interleave read sizes back on CUDA). A dispatch mode
# sees every aten op of forward AND backward (autograd's C++ kernels included). `.tolist()`,
# `.numpy()` and `.cpu()` bypass dispatch on CPU tensors, so the layer is also run on the meta
# device, where any read of tensor data raises.
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "repeat_interleave")


class _SyncDetector(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if any(op in name for op in _SYNC_OPS):
            self.syncs.append(name)
        if "index" in name:  # boolean-mask indexing computes nonzero internally
            flat = [a for a in args if isinstance(a, (list, tuple))]
            for seq in flat:
                if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in seq):
                    self.syncs.append(name + "(bool mask)")
        return func(*args, **(kwargs or {}))


def _layer_fwd_bwd(layer: MoELayer, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    y = layer(x, mask)
    y.float().sum().backward()


def test_sync_detector_catches_host_reads() -> None:
    with _SyncDetector() as det:
        x = torch.randn(5)
        _ = x[x > 0]
        _ = bool(x.sum() > 0)
    assert len(det.syncs) >= 2


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_pad_to_capacity_never_syncs(policy: str) -> None:
    cfg = tiny_config(
        capacity_factor=1.0, pad_to_capacity=True, drop_policy=policy, enable_expert_bias=True,
        num_groups=4, group_topk=2, load_balancing_type="seq_aux_loss", aux_loss_coeff=1e-3, z_loss_coeff=1e-3,
    )
    layer = initialized(MoELayer(cfg, 0))
    x = torch.randn(2, 6, 32, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with _SyncDetector() as det:
        _layer_fwd_bwd(layer, x, mask)
    assert det.syncs == []
    with torch.device("meta"):
        meta_layer = MoELayer(cfg, 0)
        xm = torch.randn(2, 6, 32, requires_grad=True)
    _layer_fwd_bwd(meta_layer, xm, mask.to("meta"))  # any read of data would raise on meta
    assert meta_layer.experts.gate_up_proj.grad is not None


def test_dropless_and_dropping_grouped_paths_never_sync() -> None:
    for moe_kwargs in (dict(), dict(capacity_factor=1.0)):
        cfg = tiny_config(**moe_kwargs)
        layer = initialized(MoELayer(cfg, 0))
        with _SyncDetector() as det:
            _layer_fwd_bwd(layer, torch.randn(2, 6, 32, requires_grad=True))
        assert det.syncs == []
        # meta grouped_mm mirrors the CUDA kernel: bf16 only.
        with torch.device("meta"):
            meta_layer = MoELayer(cfg, 0).to(torch.bfloat16)
            xm = torch.randn(2, 6, 32, dtype=torch.bfloat16, requires_grad=True)
        _layer_fwd_bwd(meta_layer, xm)


def test_fallback_without_grouped_kernel_never_reads_the_host() -> None:
    """Without a grouped kernel an accelerator takes the tiled fallback: static tiles built on the
    device, so a meta-device layer (where any read of data raises) runs forward and backward, for
    the dropless and the capacity-drop dispatch."""
    for moe_kwargs in (dict(), dict(capacity_factor=1.0)):
        cfg = tiny_config(use_grouped_gemm=False, **moe_kwargs)
        with torch.device("meta"):
            layer = initialized(MoELayer(cfg, 0))
            xm = torch.randn(2, 6, 32, requires_grad=True)
        _layer_fwd_bwd(layer, xm)
        assert layer.experts.gate_up_proj.grad is not None and layer.experts.down_proj.grad is not None


def test_dispatcher_validates() -> None:
    with pytest.raises(ValueError):
        TokenDispatcher(E, E + 1)
    with pytest.raises(ValueError):
        TokenDispatcher(E, K, pad_to_capacity=True)
    with pytest.raises(ValueError):
        TokenDispatcher(E, K, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError):
        bad_k = torch.zeros(3, 3, dtype=torch.long)
        TokenDispatcher(E, K).dispatch_preprocess(torch.randn(3, H), torch.rand(3, 3), bad_k)
