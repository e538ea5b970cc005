"""Train/valid/test GPT datasets from the config: one prefix, a weighted blend, or mock data.

Every prefix is split by `--split` over its own documents (Megatron's rule, see
`helpers.split_document_ranges`); a blend blends the same split of every prefix, asking each
for weight * n * 1.005 samples (rounded up) so the greedy blend never runs short.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.dataset_config import GPTDatasetConfig
from megatron.core.datasets.gpt_dataset import GPTDataset, LowLevelDataset, MockGPTDataset, MockGPTLowLevelDataset
from megatron.core.datasets.helpers import SPLIT_NAMES, blend_dataset_sizes, split_document_ranges
from megatron.core.datasets.index_cache import index_cache_directory
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError
from megatron.core.datasets.token_range import check_token_ids

logger = logging.getLogger(__name__)

Dataset = Union[GPTDataset, BlendedDataset]


def _check_num_samples(train_valid_test_num_samples: Sequence[int]) -> tuple[int, int, int]:
    nums = tuple(train_valid_test_num_samples)
    if len(nums) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in nums):
        raise ValueError(f"train/valid/test sample counts must be three non-negative integers, got {nums!r}")
    return tuple(int(n) for n in nums)  # type: ignore[return-value]


def _open(prefix: str, config: GPTDatasetConfig) -> IndexedDataset:
    """Open and validate one prefix; with `config.vocab_size`, also check its token ids (cached
    scan, see token_range.py)."""
    try:
        dataset = IndexedDataset(prefix)
        if config.vocab_size is not None:
            check_token_ids(dataset, config.vocab_size, index_cache_directory(prefix, config.path_to_cache))
        return dataset
    except IndexedDatasetError as exc:
        raise ValueError(f"--data-path {prefix!r}: {exc}") from exc


def _split_dataset(
    cls: type,
    low_level: LowLevelDataset,
    document_range: Optional[tuple[int, int]],
    num_samples: int,
    config: GPTDatasetConfig,
    split_name: str,
    source: str,
) -> Optional[GPTDataset]:
    """One split of one low-level dataset; None for a split of weight 0, or an empty split that
    nobody asks samples of. An empty split that must give samples is the user's `--split`."""
    if document_range is None:
        return None
    begin, end = document_range
    tokens = int(np.sum(low_level.sequence_lengths[begin:end], dtype=np.int64))
    if tokens == 0:
        if num_samples == 0:
            return None
        raise ValueError(
            f"--split {config.split!r} leaves the {split_name} split of {source} no tokens "
            f"(documents [{begin}, {end}) of {len(low_level.sequence_lengths)}) but {num_samples} samples are needed"
        )
    dataset = cls(low_level, document_range, num_samples, config, split_name)
    logger.info("%s %s: documents [%d, %d), %d samples (%d epochs)", source, split_name, begin, end,
                len(dataset), dataset.plan.num_epochs)
    return dataset


def build_train_valid_test_datasets(
    config: GPTDatasetConfig, train_valid_test_num_samples: Sequence[int]
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """(train, valid, test) datasets with at least the requested number of samples each.

    A split of weight 0 in `--split` gives None. Single prefix: GPTDatasets (length >= the
    request: whole epochs). Blend: BlendedDatasets of exactly the requested length. Mock:
    MockGPTDatasets over MockGPTLowLevelDataset.
    """
    nums = _check_num_samples(train_valid_test_num_samples)
    split_weights = config.split_weights

    if config.mock:
        low_level = MockGPTLowLevelDataset.from_config(config)
        ranges = split_document_ranges(split_weights, len(low_level))
        return tuple(  # type: ignore[return-value]
            _split_dataset(MockGPTDataset, low_level, ranges[i], nums[i], config, name, "mock data")
            for i, name in enumerate(SPLIT_NAMES)
        )

    prefixes = [prefix for _, prefix in config.blend]
    low_levels = [_open(prefix, config) for prefix in prefixes]
    ranges = [split_document_ranges(split_weights, len(ds)) for ds in low_levels]

    if len(prefixes) == 1:
        return tuple(  # type: ignore[return-value]
            _split_dataset(GPTDataset, low_levels[0], ranges[0][i], nums[i], config, name, prefixes[0])
            for i, name in enumerate(SPLIT_NAMES)
        )

    weights = config.blend_weights
    out: list[Optional[Dataset]] = []
    for i, name in enumerate(SPLIT_NAMES):
        sizes = blend_dataset_sizes(weights, nums[i])
        parts = [
            _split_dataset(GPTDataset, ds, r[i], size, config, name, prefix)
            for ds, r, size, prefix in zip(low_levels, ranges, sizes, prefixes)
        ]
        if any(part is None for part in parts):  # weight-0 split, or nothing asked of an empty one
            out.append(None)
            continue
        out.append(BlendedDataset(parts, weights, nums[i], config))
    return out[0], out[1], out[2]
