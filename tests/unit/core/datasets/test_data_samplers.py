"""Pretraining samplers: Megatron's order, exact resume, and the DataLoader wiring."""

import itertools

import numpy as np
import pytest

from megatron.core.datasets.data_samplers import PretrainingSampler, RandomPretrainingSampler, build_data_loader


def reference_batches(total, consumed, mbs, rank, dp, drop_last=True):
    """Megatron's MegatronPretrainingSampler loop, verbatim in spirit."""
    batch, out = [], []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == mbs * dp:
            out.append(batch[rank * mbs : (rank + 1) * mbs])
            batch = []
    if batch and not drop_last:
        part = batch[rank * mbs : (rank + 1) * mbs]
        if part:
            out.append(part)
    return out


@pytest.mark.parametrize("dp", [1, 2, 3, 8])
@pytest.mark.parametrize("mbs", [1, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_order_matches_megatron(dp, mbs, drop_last):
    total = 203
    for rank in range(dp):
        sampler = PretrainingSampler(total, 0, mbs, rank, dp, drop_last)
        batches = list(sampler)
        assert batches == reference_batches(total, 0, mbs, rank, dp, drop_last)
        assert len(sampler) == len(batches)
    # the ranks together cover each global micro-batch exactly once
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    covered = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert covered == list(range((total // (mbs * dp)) * mbs * dp))


@pytest.mark.parametrize("dp,mbs", [(1, 1), (2, 3), (4, 2), (8, 1)])
def test_resume_gives_exactly_the_tail(dp, mbs):
    total = 500
    global_batch = mbs * dp * 3  # three micro-batches per step
    for rank in range(dp):
        full = list(PretrainingSampler(total, 0, mbs, rank, dp))
        for steps in range(0, total // global_batch):
            consumed = steps * global_batch
            resumed = list(PretrainingSampler(total, consumed, mbs, rank, dp))
            assert resumed == full[consumed // (mbs * dp):]


@pytest.mark.parametrize(
    "args",
    [(0, 0, 1, 0, 1), (10, 10, 1, 0, 1), (10, -1, 1, 0, 1), (10, 0, 0, 0, 1), (10, 0, 1, 2, 2), (10, 0, 1, 0, 0)],
)
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        PretrainingSampler(*args)


@pytest.mark.parametrize("dp,mbs", [(1, 2), (3, 2), (4, 1)])
def test_random_sampler_is_cyclic_and_resumes_exactly(dp, mbs):
    total = 50
    epoch_length = total - total % (mbs * dp)
    per_rank_epoch = epoch_length // (mbs * dp)
    full = {r: list(itertools.islice(RandomPretrainingSampler(total, 0, mbs, r, dp, seed=3), 3 * per_rank_epoch))
            for r in range(dp)}
    for epoch in range(3):
        seen = sorted(i for r in range(dp) for b in full[r][epoch * per_rank_epoch:(epoch + 1) * per_rank_epoch] for i in b)
        assert len(seen) == len(set(seen)) == epoch_length and max(seen) < total
    assert full[0][:per_rank_epoch] != full[0][per_rank_epoch : 2 * per_rank_epoch]  # reshuffled per epoch
    for rank in range(dp):
        for step in (1, per_rank_epoch - 1, per_rank_epoch, per_rank_epoch + 2):
            resumed = RandomPretrainingSampler(total, step * mbs * dp, mbs, rank, dp, seed=3)
            assert list(itertools.islice(resumed, 3 * per_rank_epoch - step)) == full[rank][step:]


class ToyDataset:
    def __len__(self):
        return 40

    def __getitem__(self, idx):
        return {"tokens": np.full(4, idx, dtype=np.int64), "loss_mask": np.ones(4, dtype=np.float32)}


def test_data_loader_uses_the_sampler():
    import torch

    sampler = PretrainingSampler(40, 8, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    loader = build_data_loader(ToyDataset(), sampler, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(sampler) == 8
    assert isinstance(batches[0]["tokens"], torch.Tensor) and batches[0]["tokens"].shape == (2, 4)
    assert batches[0]["tokens"][:, 0].tolist() == [10, 11]
    assert batches[0]["loss_mask"].dtype == torch.float32
    assert build_data_loader(None, sampler, 0) is None
    with pytest.raises(ValueError, match="--num-workers"):
        build_data_loader(ToyDataset(), sampler, -1)


def test_data_loader_with_workers_matches():
    sampler = PretrainingSampler(40, 0, 4, 0, 1)
    in_process = [b["tokens"].tolist() for b in build_data_loader(ToyDataset(), sampler, num_workers=0)]
    with_workers = [b["tokens"].tolist() for b in build_data_loader(ToyDataset(), sampler, num_workers=2)]
    assert in_process == with_workers
