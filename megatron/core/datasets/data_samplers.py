"""Batch samplers for pre-training, resumable exactly from a checkpoint's consumed_samples.

The global order of samples is 0, 1, 2, ... (the datasets are shuffled already). It is cut into
global micro-batches of micro_batch_size * data_parallel_size samples; data-parallel rank r takes
[r * mbs, (r + 1) * mbs) of each. A run that stopped after `consumed_samples` (a multiple of the
global batch) and restarts with it sees exactly the micro-batches it would have seen next.

Only `build_data_loader` needs torch, and imports it there.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np


def _check_common(consumed_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int) -> None:
    if micro_batch_size <= 0:
        raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0:
        raise ValueError(f"data-parallel size must be positive, got {data_parallel_size}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data-parallel rank {data_parallel_rank} is outside [0, {data_parallel_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")


class PretrainingSampler:
    """Sequential micro-batches of sample indices for one data-parallel rank (Megatron's
    MegatronPretrainingSampler).

    Yields lists of `micro_batch_size` ints, from sample `consumed_samples` to `total_samples`.
    Global micro-batches are counted from `consumed_samples`. The last, incomplete global batch
    is dropped unless drop_last=False, in which case rank r gets its slice of it (possibly empty,
    then nothing is yielded).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        _check_common(consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if total_samples <= 0:
            raise ValueError(f"no samples to consume: total_samples is {total_samples}")
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left to consume: consumed {consumed_samples} of {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def _local_range(self, global_start: int, global_end: int) -> tuple[int, int]:
        start = min(global_start + self.data_parallel_rank * self.micro_batch_size, global_end)
        return start, min(start + self.micro_batch_size, global_end)

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        if rest and not self.drop_last:
            start, end = self._local_range(self.total_samples - rest, self.total_samples)
            full += end > start
        return full

    def __iter__(self) -> Iterator[list[int]]:
        global_start = self.consumed_samples
        while global_start + self.global_micro_batch <= self.total_samples:
            start, end = self._local_range(global_start, global_start + self.global_micro_batch)
            yield list(range(start, end))
            global_start += self.global_micro_batch
        if global_start < self.total_samples and not self.drop_last:
            start, end = self._local_range(global_start, self.total_samples)
            if end > start:
                yield list(range(start, end))


class RandomPretrainingSampler:
    """Cyclic variant: endless epochs over `total_samples`, each in a fresh random order.

    Epoch e orders the samples by a permutation drawn from (seed, e) and keeps the first
    `total_samples - total_samples % (mbs * dp)` of them (whole global micro-batches; which
    samples are left out changes per epoch). Position p of the endless stream is epoch
    p // epoch_length, so resuming from consumed_samples is exact, as for PretrainingSampler.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int = 0,
    ) -> None:
        _check_common(consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.global_micro_batch = micro_batch_size * data_parallel_size
        if total_samples < self.global_micro_batch:
            raise ValueError(
                f"{total_samples} samples do not fill one global micro-batch of {self.global_micro_batch}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.epoch_length = total_samples - total_samples % self.global_micro_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [epoch_length]: the global sample order of `epoch`."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.total_samples)[: self.epoch_length]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = divmod(self.consumed_samples, self.epoch_length)
        lo = self.data_parallel_rank * self.micro_batch_size
        while True:
            order = self.epoch_order(epoch)
            while position + self.global_micro_batch <= self.epoch_length:
                yield order[position + lo : position + lo + self.micro_batch_size].tolist()
                position += self.global_micro_batch
            epoch, position = epoch + 1, 0


def build_data_loader(
    dataset: Any, sampler: Any, num_workers: int, pin_memory: bool = False, seed: Optional[int] = None
) -> Any:
    """A torch DataLoader over `dataset` with `sampler` as its batch_sampler (None for no dataset).

    Workers stay alive across epochs (`persistent_workers`) so a cyclic sampler does not re-fork
    them. `seed` seeds the loader's generator (only worker seeding depends on it; samples do not).
    """
    if dataset is None:
        return None
    if num_workers < 0:
        raise ValueError(f"--num-workers must be non-negative, got {num_workers}")
    import torch

    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
