"""Expert parallelism (EP2 on real gloo groups) against a single-process MoELayer with the same full weights.

Every worker draws every rank's tokens from a shared seed, runs its EP layer on its own tokens and a
single-process reference layer on all of them, and compares its part:
- dropless: the reference runs once on the concatenation of both ranks' tokens;
- token drop: the capacity applies to each source rank's tokens (C = ceil(T_local * k / E * cf) per
  expert and per source rank), so the reference runs the single-device layer separately on each
  rank's tokens (dropping over the same token groups) and accumulates the gradients.
Replicated parameters (router, shared experts) hold partial gradients per rank: their sum over the
ranks is compared (what the DP gradient reduction does); expert shards are compared directly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from tests.dist_utils import spawn
from tests.unit.core.transformer.moe.moe_test_utils import tiny_config
from tests.unit.core.transformer.moe.test_moe_token_dispatcher import _SyncDetector

from megatron.core.parallel_state import ParallelConfig, ParallelState, RankGrid
from megatron.core.transformer.moe import (
    AllGatherTokenDispatcher,
    AllToAllTokenDispatcher,
    MoELayer,
    TokenDispatcher,
    all_to_all,
    build_token_dispatcher,
    shard_expert_weights,
)
from megatron.core.transformer.parallel_context import ExpertParallelContext, ParallelContext

WORLD = 2
H, B, S = 16, 2, 6  # T_local = 12 tokens per rank
TOL = 1e-6
V3 = dict(num_groups=4, group_topk=2, enable_expert_bias=True, routed_scaling_factor=2.5, norm_topk_prob=True)
BIAS = torch.tensor([0.1, -0.05, 0.0, 0.2, -0.1, 0.05, -0.2, 0.15])


# ---- helpers ------------------------------------------------------------------------------------------
def close(actual: Optional[torch.Tensor], expected: torch.Tensor, name: str, tol: float = TOL) -> None:
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ref = expected.double().norm()
    assert ref > 0, f"{name}: reference is all zeros, the check would be vacuous"
    err = ((actual.double() - expected.double()).norm() / ref).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def make_pair(cfg, state: ParallelState, dispatcher: str, seed: int) -> Tuple[MoELayer, MoELayer]:
    """(single-process reference, EP layer) with the same full weights."""
    torch.manual_seed(seed)
    ref = MoELayer(cfg, 0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
        if ref.router.expert_bias is not None:
            ref.router.expert_bias.copy_(BIAS[: cfg.moe.num_experts])
    ep = MoELayer(cfg, 0, ParallelContext.from_parallel_state(state, dispatcher))
    replicated = {k: v for k, v in ref.state_dict().items() if not k.startswith("experts.")}
    missing, unexpected = ep.load_state_dict(replicated, strict=False)
    assert sorted(missing) == ["experts.down_proj", "experts.gate_up_proj"] and not unexpected
    ep.load_full_expert_weights(ref.experts.gate_up_proj, ref.experts.down_proj)
    return ref, ep


def draw_inputs(seed: int, padded_rank: Optional[int] = 1):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, S, H, generator=gen) for _ in range(WORLD)]
    gs = [torch.randn(B, S, H, generator=gen) for _ in range(WORLD)]
    masks = [torch.ones(B, S, dtype=torch.bool) for _ in range(WORLD)]
    if padded_rank is not None:
        masks[padded_rank][1, 3:] = False  # padding tokens take no capacity and count no load
    return xs, gs, masks


def run_reference(ref: MoELayer, xs, gs, masks, rank: int, per_group: bool) -> Dict[str, Any]:
    """This rank's output / input grad, and the layer's parameter grads, from the single-process layer."""
    if per_group:  # drop over each source rank's tokens: one call per rank, grads accumulate
        outs, grads, dropped = [], [], []
        for x, g, m in zip(xs, gs, masks):
            x = x.clone().requires_grad_()
            y = ref(x, m)
            y.backward(g)
            outs.append(y.detach())
            grads.append(x.grad)
            dropped.append(ref.last_stats.dropped_fraction)
        return {"out": outs[rank], "x_grad": grads[rank], "dropped": dropped}
    x = torch.cat(xs).requires_grad_()
    y = ref(x, torch.cat(masks))
    y.backward(torch.cat(gs))
    part = slice(rank * B, (rank + 1) * B)
    return {"out": y.detach()[part], "x_grad": x.grad[part], "dropped": None}


def compare_layer(ep: MoELayer, ref: MoELayer, xs, gs, masks, rank: int, per_group: bool, case: str) -> None:
    x = xs[rank].clone().requires_grad_()
    y = ep(x, masks[rank])
    y.backward(gs[rank])
    want = run_reference(ref, xs, gs, masks, rank, per_group)
    close(y, want["out"], f"{case}: output")
    close(x.grad, want["x_grad"], f"{case}: input grad")
    for name in ("gate_up_proj", "down_proj"):
        full = getattr(ref.experts, name).grad
        close(getattr(ep.experts, name).grad, shard_expert_weights(full, rank, WORLD), f"{case}: expert {name} shard")
    ep_params, ref_params = dict(ep.named_parameters()), dict(ref.named_parameters())
    for name, p in ep_params.items():
        if name.startswith("experts."):
            continue
        summed = p.grad.clone()
        dist.all_reduce(summed)  # replicated weights: partial grads summed over the ranks
        close(summed, ref_params[name].grad, f"{case}: {name} grad")
    if per_group:
        assert torch.equal(ep.last_stats.dropped_fraction, want["dropped"][rank]), case


# ---- worker 1: forward / backward equality --------------------------------------------------------
def check_dropless(state: ParallelState, rank: int, dispatcher: str) -> None:
    cases = [
        ("v3 groups+bias E8", tiny_config(hidden=H, **V3)),
        ("v2 softmax E4", tiny_config(hidden=H, num_experts=4, score_function="softmax", num_shared_experts=2)),
        ("v3 E2 k1 (one local expert)", tiny_config(hidden=H, num_experts=2, topk=1, num_shared_experts=0)),
    ]
    for i, (name, cfg) in enumerate(cases):
        case = f"{dispatcher} dropless {name}"
        ref, ep = make_pair(cfg, state, dispatcher, seed=10 + i)
        xs, gs, masks = draw_inputs(seed=20 + i)
        compare_layer(ep, ref, xs, gs, masks, rank, per_group=False, case=case)
        if cfg.moe.enable_expert_bias:
            check_bias_update(ep, ref, state, case)


def check_bias_update(ep: MoELayer, ref: MoELayer, state: ParallelState, case: str) -> None:
    """The load reduced over the router load groups of the layout (the stage's TP x DP ranks) equals
    the single-process count of all tokens."""
    groups = ParallelContext.from_parallel_state(state).router_load_groups
    assert len(groups) == 1, f"{case}: EP2 = DP2 here, one load group expected"
    local = ep.router.local_tokens_per_expert.clone()
    expected = ref.router.local_tokens_per_expert.clone()
    assert not torch.equal(local, expected), f"{case}: every rank must count only its own tokens"
    loads = local.clone()
    for group in groups:
        dist.all_reduce(loads, group=group)
    assert torch.equal(loads, expected), f"{case}: reduced load {loads} != {expected}"
    ep.router.update_expert_bias(loads)
    ref.router.update_expert_bias()
    assert torch.equal(ep.router.expert_bias, ref.router.expert_bias), case


def check_token_drop(state: ParallelState, rank: int, dispatcher: str) -> None:
    for i, (policy, pad) in enumerate([("probs", False), ("position", False), ("probs", True), ("position", True)]):
        case = f"{dispatcher} drop {policy} pad={pad}"
        extra = dict(load_balancing_type="seq_aux_loss", aux_loss_coeff=1e-2, z_loss_coeff=1e-3) if i == 0 else {}
        cfg = tiny_config(hidden=H, capacity_factor=0.5, pad_to_capacity=pad, drop_policy=policy, **V3, **extra)
        ref, ep = make_pair(cfg, state, dispatcher, seed=30 + i)
        xs, gs, masks = draw_inputs(seed=40 + i)
        compare_layer(ep, ref, xs, gs, masks, rank, per_group=True, case=case)
        assert ep.dispatcher.capacity(B * S) == 2  # ceil(12 * 2 / 8 * 0.5), per expert and source rank
        assert float(ep.last_stats.dropped_fraction) > 0, f"{case}: the example must really drop"


def check_all_to_all_autograd(group, rank: int) -> None:
    """Uneven splits: rank r sends (r + 1) rows to each rank; backward returns each grad to its sender."""
    x = (torch.arange(2 * (rank + 1) * 3, dtype=torch.float32).view(-1, 3) + 100 * rank).requires_grad_()
    out = all_to_all(x, group, output_splits=[1, 2], input_splits=[rank + 1, rank + 1])
    assert out.shape == (3, 3)
    assert torch.equal(out[:1], (torch.arange(3.0) + 100 * 0 + 3 * rank).view(1, 3))  # from rank 0: row r
    (out * (rank + 1)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0], [2.0]]).repeat_interleave(rank + 1, 0).expand(-1, 3))


# ---- worker 2: no host synchronisation with alltoall + pad_to_capacity ----------------------------------
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def run_recording_host_reads(fn: Callable[[], None]) -> List[str]:
    """Run `fn` under the aten-level sync detector AND with the Python-level Tensor reads patched to record
    (on CPU `.tolist()` / `.cpu()` bypass the dispatcher, so the detector alone could miss them)."""
    calls: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def recorder(name: str, original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapped

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, recorder(name, original))
        with _SyncDetector() as detector:
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls + detector.syncs


def check_no_host_sync(state: ParallelState, rank: int) -> None:
    moe = dict(load_balancing_type="seq_aux_loss", aux_loss_coeff=1e-2, z_loss_coeff=1e-3, drop_policy="probs", **V3)
    xs, gs, masks = draw_inputs(seed=50)
    for dispatcher in ("alltoall", "allgather"):
        cfg = tiny_config(hidden=H, capacity_factor=1.0, pad_to_capacity=True, **moe)
        _, ep = make_pair(cfg, state, dispatcher, seed=51)
        x = xs[rank].clone().requires_grad_()
        reads = run_recording_host_reads(lambda: ep(x, masks[rank]).backward(gs[rank]))
        assert reads == [], f"{dispatcher} + pad_to_capacity read the host: {reads}"
        assert ep.experts.gate_up_proj.grad is not None and x.grad is not None
    # Positive control: dropless all-to-all needs its split sizes on the host, and the recorder sees it.
    _, ep = make_pair(tiny_config(hidden=H, **moe), state, "alltoall", seed=52)
    reads = run_recording_host_reads(lambda: ep(xs[rank], masks[rank]).sum().backward())
    assert "tolist" in reads, reads


def check_layout_errors(state: ParallelState) -> None:
    with pytest.raises(ValueError, match="divisible"):
        MoELayer(tiny_config(hidden=H, num_experts=3, topk=1, num_shared_experts=0), 0, ParallelContext.from_parallel_state(state))


# ---- process plumbing ---------------------------------------------------------------------------------
def _init() -> ParallelState:
    torch.set_num_threads(1)
    state = ParallelState.build(ParallelConfig(expert_model_parallel_size=WORLD))
    assert state.size("ep") == WORLD and state.size("edp") == 1 and state.size("dp") == WORLD
    return state


def _worker(rank: int, world: int) -> None:
    state = _init()
    r = state.rank_in("ep")
    check_all_to_all_autograd(state.group("ep"), r)
    for dispatcher in ("alltoall", "allgather"):
        check_dropless(state, r, dispatcher)
        check_token_drop(state, r, dispatcher)
    check_no_host_sync(state, r)
    check_layout_errors(state)


@pytest.mark.slow
def test_ep2_matches_single_process_and_pad_never_syncs() -> None:
    """One gloo group of 2 ranks: equality of both dispatchers (dropless, drop, pad), bias-update loads,
    the differentiable all_to_all, and the host-sync proof of alltoall + pad_to_capacity."""
    spawn(WORLD, _worker, timeout_s=60)


# ---- single process -------------------------------------------------------------------------------------
def test_expert_weights_are_tagged_and_sharded() -> None:
    layer = MoELayer(tiny_config(hidden=H), 0)
    tagged = {n for n, p in layer.named_parameters() if getattr(p, "is_expert", False)}
    assert tagged == {"experts.gate_up_proj", "experts.down_proj"}
    full = torch.arange(8.0).view(8, 1)
    assert torch.equal(shard_expert_weights(full, 1, 2), full[4:])
    assert torch.equal(shard_expert_weights(full, 0, 1), full)
    for bad in ((2, 2), (0, 3)):
        with pytest.raises(ValueError):
            shard_expert_weights(full, *bad)
    layer.load_full_expert_weights(torch.ones(8, 32, H), torch.zeros(8, H, 16))
    assert torch.equal(layer.experts.gate_up_proj, torch.ones(8, 32, H))


def test_single_rank_layouts_use_the_local_dispatcher() -> None:
    cfg = tiny_config(hidden=H)
    state = ParallelState.build(ParallelConfig())
    for kind in ("alltoall", "allgather"):
        layer = MoELayer(cfg, 0, ParallelContext.from_parallel_state(state, kind))
        assert type(layer.dispatcher) is TokenDispatcher and layer.num_local_experts == 8
    assert type(build_token_dispatcher(cfg.moe, ExpertParallelContext(dispatcher="allgather"))) is TokenDispatcher
    with pytest.raises(ValueError, match="dispatcher-type"):
        ExpertParallelContext(dispatcher="broadcast")
    # Refused layouts (checked before any group is used): expert TP > 1, and TP > 1 without SP.
    etp = ParallelState(grid=RankGrid(2, tp=2, pp=1, ep=1, etp=2), rank=0, sequence_parallel=True,
                        ranks={kind: [0, 1] for kind in ("tp", "etp")})
    with pytest.raises(ValueError, match="expert-tensor-parallel-size 1"):
        ParallelContext.from_parallel_state(etp)
    no_sp = ParallelState(grid=RankGrid(2, tp=2, pp=1, ep=2, etp=1), rank=0, sequence_parallel=False,
                          ranks={"tp": [0, 1], "etp": [0], "ep": [0, 1], "dp": [0]},
                          groups={"tp": None, "ep": None, "dp": None})
    with pytest.raises(ValueError, match="--sequence-parallel"):
        MoELayer(cfg, 0, ParallelContext.from_parallel_state(no_sp))
    # EP dispatchers on a group of one are the local dispatcher with identity communication.
    for cls in (AllToAllTokenDispatcher, AllGatherTokenDispatcher):
        d = cls.from_config(cfg.moe, None)
        assert d.ep_size == 1 and d.num_local_experts == 8
