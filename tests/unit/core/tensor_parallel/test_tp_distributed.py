"""Tensor-parallel mappings, layers and cross entropy on real gloo groups, against single-process references.

Each test spawns ONE process group and runs many checks inside it. Every rank knows every rank's
inputs (they are drawn from a shared seed), so it computes the expected result locally with plain
torch (nn.Linear, nn.Embedding, F.cross_entropy, sums and slices) and compares it with what the
collectives produced. A failed assertion in any rank makes spawn (tests.dist_utils) terminate the others and raise.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_along_dim,
    allreduce_sequence_parallel_grads,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    model_parallel_rng_tracker,
    reduce_from_region,
    reduce_scatter_along_dim,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_region,
    scatter_to_sequence_parallel_region,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from tests.dist_utils import spawn

TP = 2
S, B, H_IN, H_OUT, VOCAB = 4, 2, 6, 8, 10


# ---- comparison helpers -------------------------------------------------------------------------
def close(actual, expected, name, tol=1e-6):
    """Norm-relative comparison; the expected tensor must be non-trivial so the check can fail."""
    assert actual is not None, f"{name}: missing (no gradient?)"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ref = expected.double().norm()
    assert ref > 0, f"{name}: reference is all zeros, the check would be vacuous"
    err = ((actual.double() - expected.double()).norm() / ref).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def chunk(t, dim, r):
    return t.chunk(TP, dim=dim)[r]


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


# ---- checks (each rank runs the same sequence of collectives) ------------------------------------
def check_mappings(group, r, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [randn(gen, S, B, H_IN) for _ in range(TP)]  # rank k's input is xs[k]
    gs = [randn(gen, S, B, H_IN) for _ in range(TP)]  # rank k's upstream grad (full-size outputs)
    half_last = [randn(gen, S, B, H_IN // TP) for _ in range(TP)]  # [.., h/tp] tensors
    half_seq = [randn(gen, S // TP, B, H_IN) for _ in range(TP)]  # [s/tp, ..] tensors

    def leaf(t):
        return t.clone().requires_grad_()

    x = leaf(xs[r])
    y = copy_to_region(x, group)
    assert torch.equal(y, xs[r])
    y.backward(gs[r])
    close(x.grad, gs[0] + gs[1], "copy_to_region bwd all-reduce")

    x = leaf(xs[r])
    y = reduce_from_region(x, group)
    close(y, xs[0] + xs[1], "reduce_from_region fwd")
    y.backward(gs[r])
    assert torch.equal(x.grad, gs[r]), "reduce_from_region bwd must be the identity"

    x = leaf(xs[r])
    y = scatter_to_region(x, group)
    assert torch.equal(y, chunk(xs[r], -1, r))
    y.backward(half_last[r])
    assert torch.equal(x.grad, torch.cat(half_last, -1)), "scatter_to_region bwd all-gather"

    x = leaf(half_last[r])
    y = gather_from_region(x, group)
    assert torch.equal(y, torch.cat(half_last, -1))
    y.backward(gs[r])
    assert torch.equal(x.grad, chunk(gs[r], -1, r)), "gather_from_region bwd split"

    x = leaf(xs[r])
    y = scatter_to_sequence_parallel_region(x, group)
    assert torch.equal(y, chunk(xs[r], 0, r))
    y.backward(half_seq[r])
    assert torch.equal(x.grad, torch.cat(half_seq, 0)), "scatter_to_sequence_parallel_region bwd"

    for tp_grad in (True, False):
        x = leaf(half_seq[r])
        y = gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=tp_grad)
        assert torch.equal(y, torch.cat(half_seq, 0))
        y.backward(gs[r])
        expected = chunk(gs[0] + gs[1], 0, r) if tp_grad else chunk(gs[r], 0, r)
        close(x.grad, expected, f"gather_from_sequence_parallel_region bwd (tp_grad={tp_grad})")

    x = leaf(xs[r])
    y = reduce_scatter_to_sequence_parallel_region(x, group)
    close(y, chunk(xs[0] + xs[1], 0, r), "reduce_scatter_to_sequence_parallel_region fwd")
    y.backward(half_seq[r])
    assert torch.equal(x.grad, torch.cat(half_seq, 0)), "reduce_scatter_to_sequence_parallel_region bwd"

    # A chosen dim other than 0 (here the batch dim).
    x = leaf(xs[r])
    y = reduce_scatter_to_sequence_parallel_region(x, group, dim=1)
    close(y, chunk(xs[0] + xs[1], 1, r), "reduce-scatter along dim 1")
    y.backward(chunk(gs[r], 1, 0))
    assert torch.equal(x.grad, torch.cat([chunk(gs[k], 1, 0) for k in range(TP)], 1))
    x = leaf(chunk(xs[r], 1, 0))
    y = gather_from_sequence_parallel_region(x, group, dim=1)
    assert torch.equal(y, torch.cat([chunk(xs[k], 1, 0) for k in range(TP)], 1))


def check_collectives(group, r, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [randn(gen, S, 6, B) for _ in range(TP)]
    for dim in (0, 1, -1):
        expected = chunk(xs[0] + xs[1], dim, r)
        for native in (None, False, True):
            x = xs[r].clone()
            try:
                out = reduce_scatter_along_dim(x, dim, group, native=native)
            except RuntimeError:
                # The installed gloo may lack reduce_scatter_tensor; it fails locally on every rank.
                assert native is True
                continue
            close(out, expected, f"reduce_scatter_along_dim(dim={dim}, native={native})")
            assert torch.equal(x, xs[r]), "reduce-scatter must not modify its input"
        for native in (None, False, True):
            try:
                gathered = all_gather_along_dim(xs[r], dim, group, native=native)
            except RuntimeError:
                assert native is True
                continue
            assert torch.equal(gathered, torch.cat(xs, dim)), f"all_gather_along_dim(dim={dim}, native={native})"
    # Non-contiguous input (a transposed view).
    out = reduce_scatter_along_dim(xs[r].transpose(0, 1), 0, group)
    close(out, chunk((xs[0] + xs[1]).transpose(0, 1), 0, r), "reduce-scatter of a non-contiguous tensor")
    with pytest.raises(ValueError, match="size 3 is not divisible by the group size 2"):
        reduce_scatter_along_dim(torch.zeros(3, 2), 0, group)


def _reference_linear(w, b, x_full, g_full):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = x_full.clone().requires_grad_()
    out = lin(x)
    out.backward(g_full)
    return out.detach(), x.grad, lin.weight.grad, lin.bias.grad


def check_column(group, r, seed):
    gen = torch.Generator().manual_seed(seed)
    w, b = randn(gen, H_OUT, H_IN), randn(gen, H_OUT)
    x_full, g_full = randn(gen, S, B, H_IN), randn(gen, S, B, H_OUT)
    out_ref, xg_ref, wg_ref, bg_ref = _reference_linear(w, b, x_full, g_full)
    for sp, gather in ((False, False), (False, True), (True, False)):
        name = f"column(sp={sp}, gather_output={gather})"
        layer = ColumnParallelLinear(H_IN, H_OUT, group, bias=True, gather_output=gather, sequence_parallel=sp)
        layer.load_full_weight(w, b)
        assert layer.weight.shape == (H_OUT // TP, H_IN)
        x = (chunk(x_full, 0, r) if sp else x_full).clone().requires_grad_()
        out = layer(x)
        if gather:
            close(out, out_ref, name + " out")
            out.backward(g_full)
        else:
            close(out, chunk(out_ref, -1, r), name + " out")
            out.backward(chunk(g_full, -1, r))
        close(x.grad, chunk(xg_ref, 0, r) if sp else xg_ref, name + " input grad")
        close(layer.weight.grad, chunk(wg_ref, 0, r), name + " weight-shard grad")
        close(layer.bias.grad, chunk(bg_ref, 0, r), name + " bias-shard grad")


def check_row(group, r, seed):
    gen = torch.Generator().manual_seed(seed)
    w, b = randn(gen, H_OUT, H_IN), randn(gen, H_OUT)
    x_full, g_full = randn(gen, S, B, H_IN), randn(gen, S, B, H_OUT)
    out_ref, xg_ref, wg_ref, bg_ref = _reference_linear(w, b, x_full, g_full)
    for sp, parallel_in in ((False, True), (False, False), (True, True)):
        name = f"row(sp={sp}, input_is_parallel={parallel_in})"
        layer = RowParallelLinear(H_IN, H_OUT, group, bias=True, input_is_parallel=parallel_in, sequence_parallel=sp)
        layer.load_full_weight(w, b)
        assert layer.weight.shape == (H_OUT, H_IN // TP)
        x = (chunk(x_full, -1, r) if parallel_in else x_full).clone().requires_grad_()
        out = layer(x)
        close(out, chunk(out_ref, 0, r) if sp else out_ref, name + " out")
        out.backward(chunk(g_full, 0, r) if sp else g_full)
        close(x.grad, chunk(xg_ref, -1, r) if parallel_in else xg_ref, name + " input grad")
        close(layer.weight.grad, chunk(wg_ref, 1, r), name + " weight-shard grad")
        if sp:
            # Each rank saw only its sequence chunk: a partial bias grad until summed over TP.
            close(layer.bias.grad, chunk(g_full, 0, r).sum((0, 1)), name + " partial bias grad")
            weight_grad = layer.weight.grad.clone()
            allreduce_sequence_parallel_grads(layer.parameters(), group)
            assert torch.equal(layer.weight.grad, weight_grad), "only sequence_parallel params are reduced"
        close(layer.bias.grad, bg_ref, name + " bias grad")


def check_embedding(group, r, seed, sp_only=False):
    gen = torch.Generator().manual_seed(seed)
    table = randn(gen, VOCAB, H_IN)
    ids = torch.tensor([[0, 9], [4, 5], [7, 2], [5, 4]])  # rank 0 owns 0..4, rank 1 owns 5..9
    g_full = randn(gen, S, B, H_IN)
    ref = nn.Embedding(VOCAB, H_IN)
    with torch.no_grad():
        ref.weight.copy_(table)
    out_ref = ref(ids)
    out_ref.backward(g_full)
    for sp in (True,) if sp_only else (False, True):
        name = f"embedding(sp={sp})"
        emb = VocabParallelEmbedding(VOCAB, H_IN, group, sequence_parallel=sp)
        emb.load_full_weight(table)
        assert emb.weight.shape == (VOCAB // TP, H_IN) and emb.vocab_start_index == r * VOCAB // TP
        out = emb(ids)
        close(out, chunk(out_ref.detach(), 0, r) if sp else out_ref.detach(), name + " out")
        out.backward(chunk(g_full, 0, r) if sp else g_full)
        close(emb.weight.grad, chunk(ref.weight.grad, 0, r), name + " weight-shard grad")


def check_sp_mlp(group, r, seed):
    """Column(SP) -> silu -> Row(SP) on a sequence-split input equals the single-process MLP."""
    gen = torch.Generator().manual_seed(seed)
    w1, b1, w2, b2 = randn(gen, H_OUT, H_IN), randn(gen, H_OUT), randn(gen, H_IN, H_OUT), randn(gen, H_IN)
    x_full, g_full = randn(gen, S, B, H_IN), randn(gen, S, B, H_IN)
    up, down = nn.Linear(H_IN, H_OUT), nn.Linear(H_OUT, H_IN)
    with torch.no_grad():
        up.weight.copy_(w1), up.bias.copy_(b1), down.weight.copy_(w2), down.bias.copy_(b2)
    xr = x_full.clone().requires_grad_()
    out_ref = down(F.silu(up(xr)))
    out_ref.backward(g_full)

    col = ColumnParallelLinear(H_IN, H_OUT, group, sequence_parallel=True)
    row = RowParallelLinear(H_OUT, H_IN, group, sequence_parallel=True)
    col.load_full_weight(w1, b1)
    row.load_full_weight(w2, b2)
    x = chunk(x_full, 0, r).clone().requires_grad_()
    out = row(F.silu(col(x)))
    close(out, chunk(out_ref.detach(), 0, r), "SP MLP out")
    out.backward(chunk(g_full, 0, r))
    allreduce_sequence_parallel_grads(list(col.parameters()) + list(row.parameters()), group)
    close(x.grad, chunk(xr.grad, 0, r), "SP MLP input grad")
    close(col.weight.grad, chunk(up.weight.grad, 0, r), "SP MLP up weight grad")
    close(col.bias.grad, chunk(up.bias.grad, 0, r), "SP MLP up bias grad")
    close(row.weight.grad, chunk(down.weight.grad, 1, r), "SP MLP down weight grad")
    close(row.bias.grad, down.bias.grad, "SP MLP down bias grad")


def check_cross_entropy(group, r, seed):
    gen = torch.Generator().manual_seed(seed)
    per_rank = VOCAB // TP
    labels_cases = {
        "mixed": torch.randint(0, VOCAB, (3, 4), generator=gen),
        "rank0 only": torch.randint(0, per_rank, (3, 4), generator=gen),
        "rank1 only": torch.randint(per_rank, VOCAB, (3, 4), generator=gen),
    }
    logits_cases = {
        "unit": randn(gen, 3, 4, VOCAB),
        # exp(100) overflows fp32 without the max shift; the larger logits sit on rank 1's shard, so
        # only the all-reduced (global) max gives the right answer.
        "large": randn(gen, 3, 4, VOCAB) * 5 + 100.0 + torch.cat([torch.zeros(per_rank), torch.full((per_rank,), 8.0)]),
    }
    for lname, full in logits_cases.items():
        for tname, labels in labels_cases.items():
            name = f"cross entropy ({lname} logits, {tname} labels)"
            g = randn(gen, 3, 4)
            ref_logits = full.clone().requires_grad_()
            ref = F.cross_entropy(ref_logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(3, 4)
            ref.backward(g)
            shard = chunk(full, -1, r).clone().requires_grad_()
            before = shard.detach().clone()
            loss = vocab_parallel_cross_entropy(shard, labels, group)
            assert torch.equal(shard.detach(), before), "the logits must not be modified"
            close(loss, ref.detach(), name + " loss")
            loss.backward(g)
            close(shard.grad, chunk(ref_logits.grad, -1, r), name + " logits-shard grad")


def check_init_and_errors(group, r, seed):
    # Same seed -> the TP shard equals the matching slice of the TP=1 (group None) layer's weight.
    for make, dim in (
        (lambda grp, gen: ColumnParallelLinear(H_IN, H_OUT, grp, generator=gen), 0),
        (lambda grp, gen: RowParallelLinear(H_IN, H_OUT, grp, generator=gen), 1),
        (lambda grp, gen: VocabParallelEmbedding(VOCAB, H_IN, grp, generator=gen), 0),
    ):
        tp_layer = make(group, torch.Generator().manual_seed(seed))
        full_layer = make(None, torch.Generator().manual_seed(seed))
        assert tp_layer.weight.shape != full_layer.weight.shape
        assert torch.equal(tp_layer.weight.detach(), chunk(full_layer.weight.detach(), dim, r))
        assert torch.equal(shard_tensor(full_layer.weight.detach(), dim, group), tp_layer.weight.detach())
    with pytest.raises(ValueError, match=r"output_size \(5\) is not divisible by the tensor-parallel size \(2\)"):
        ColumnParallelLinear(H_IN, 5, group)
    with pytest.raises(ValueError, match=r"input_size \(7\).*\(2\)"):
        RowParallelLinear(7, H_OUT, group)
    with pytest.raises(ValueError, match=r"vocabulary size \(9\).*\(2\)"):
        VocabParallelEmbedding(9, H_IN, group)
    with pytest.raises(ValueError, match="shard shape"):
        ColumnParallelLinear(H_IN, H_OUT, group).load_full_weight(torch.zeros(H_OUT, H_IN + 2))


def check_rng(group, r):
    tracker = model_parallel_rng_tracker(seed=42, tp_rank=r)
    default = torch.rand(4)
    with tracker.fork():
        forked = torch.rand(4)
    assert torch.equal(forked, torch.rand(4, generator=torch.Generator().manual_seed(42 + 2718 + r)))
    both_default = all_gather_along_dim(default, 0, group).view(TP, 4)
    both_forked = all_gather_along_dim(forked, 0, group).view(TP, 4)
    assert torch.equal(both_default[0], both_default[1]), "the default stream must agree across TP ranks"
    assert not torch.equal(both_forked[0], both_forked[1]), "the model-parallel stream must differ across TP ranks"


# ---- process plumbing ------------------------------------------------------------------------------
def _worker_tp2(rank, world):
    torch.set_num_threads(1)
    state = ParallelState.build(ParallelConfig(tensor_model_parallel_size=TP, sequence_parallel=True))
    group, r = state.group("tp"), state.rank_in("tp")
    check_mappings(group, r, seed=1)
    check_collectives(group, r, seed=2)
    check_column(group, r, seed=3)
    check_row(group, r, seed=4)
    check_embedding(group, r, seed=5)
    check_sp_mlp(group, r, seed=6)
    check_cross_entropy(group, r, seed=7)
    check_init_and_errors(group, r, seed=8)
    check_rng(group, r)


def _worker_tp2_dp2(rank, world):
    torch.set_num_threads(1)
    state = ParallelState.build(ParallelConfig(tensor_model_parallel_size=TP, sequence_parallel=True))
    group, r = state.group("tp"), state.rank_in("tp")
    assert state.size("dp") == 2
    # Ranks 2 and 3 have global ranks != TP ranks: the layers must use the rank inside the group.
    # Each DP replica uses different data, so a collective leaking across replicas would be caught.
    seed = 100 + 10 * state.rank_in("dp")
    check_collectives(group, r, seed)
    check_sp_mlp(group, r, seed + 1)
    check_embedding(group, r, seed + 2, sp_only=True)
    check_cross_entropy(group, r, seed + 3)


@pytest.mark.slow
def test_tensor_parallel_world2_matches_single_process():
    spawn(TP, _worker_tp2, timeout_s=60)


@pytest.mark.slow
def test_tensor_parallel_inside_tp2_x_dp2_groups():
    spawn(4, _worker_tp2_dp2, timeout_s=60)
