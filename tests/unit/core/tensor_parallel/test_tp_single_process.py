"""Tensor-parallel code at TP=1 (group None): identities, references, initialisation, argument errors.

The multi-rank behaviour is tested in test_tp_distributed.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    normal_init,
    reduce_from_region,
    reduce_scatter_along_dim,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_region,
    shard_tensor,
    vocab_parallel_cross_entropy,
)


def test_mappings_are_identities_without_a_group():
    x = torch.randn(4, 2, 6)
    for fn in (copy_to_region, reduce_from_region, scatter_to_region, gather_from_region,
               gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
    assert reduce_scatter_along_dim(x, 0, None) is x


def test_shard_tensor_without_a_group_is_a_copy():
    full = torch.randn(4, 6)
    shard = shard_tensor(full, 0, None)
    assert torch.equal(shard, full) and shard.data_ptr() != full.data_ptr()


def test_layers_at_tp1_match_torch_modules():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6)
    ref = nn.Linear(6, 8)
    col = ColumnParallelLinear(6, 8, None)
    row = RowParallelLinear(6, 8, None)
    col.load_full_weight(ref.weight.detach(), ref.bias.detach())
    row.load_full_weight(ref.weight.detach(), ref.bias.detach())
    torch.testing.assert_close(col(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row(x), ref(x), rtol=1e-6, atol=1e-6)
    table = torch.randn(10, 6)
    emb = VocabParallelEmbedding(10, 6, None)
    emb.load_full_weight(table)
    ids = torch.tensor([[0, 9], [3, 5]])
    assert torch.equal(emb(ids), table[ids])


def test_full_weight_initialisation_is_reproducible_from_the_generator():
    layer = ColumnParallelLinear(6, 8, None, init_method=normal_init(0.5), generator=torch.Generator().manual_seed(3))
    expected = torch.empty(8, 6)
    nn.init.normal_(expected, std=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.weight.detach(), expected)
    assert torch.equal(layer.bias.detach(), torch.zeros(8))
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    row = RowParallelLinear(6, 8, None, bias=True, sequence_parallel=False)
    assert row.weight.partition_dim == 1 and row.bias.sequence_parallel is False
    # Shard-local initialisation (no full copy) still honours the generator and dtype.
    local = VocabParallelEmbedding(10, 4, None, generator=torch.Generator().manual_seed(3), full_init=False, dtype=torch.float64)
    assert local.weight.dtype == torch.float64 and local.weight.std().item() > 0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="gather_output and sequence_parallel"):
        ColumnParallelLinear(6, 8, None, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel"):
        RowParallelLinear(6, 8, None, input_is_parallel=False, sequence_parallel=True)
    col = ColumnParallelLinear(6, 8, None, bias=False)
    with pytest.raises(ValueError, match=r"shard shape \(8, 5\) does not match the parameter \(8, 6\)"):
        col.load_full_weight(torch.zeros(8, 5))
    with pytest.raises(ValueError, match="bias=False"):
        col.load_full_weight(torch.zeros(8, 6), torch.zeros(8))
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.zeros(2), None)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_cross_entropy_matches_torch_at_tp1(scale):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 11, generator=gen) * scale).requires_grad_()
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    upstream = torch.randn(3, 4, generator=gen)
    ours = vocab_parallel_cross_entropy(logits, labels, None)
    ours.backward(upstream)
    ours_grad = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").reshape(3, 4)
    ref.backward(upstream)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-6)


def test_cross_entropy_bf16_logits_get_bf16_grads_and_survive_retain_graph():
    logits = torch.randn(5, 7).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([0, 6, 3, 3, 1])
    loss = vocab_parallel_cross_entropy(logits, labels, None)
    assert loss.dtype == torch.float32
    loss.sum().backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.sum().backward()  # the saved softmax must not have been modified by the first backward
    assert logits.grad.dtype == torch.bfloat16 and torch.equal(logits.grad, first)
    ref = F.cross_entropy(logits.detach().float(), labels, reduction="none")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)
