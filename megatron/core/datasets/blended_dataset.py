"""A weighted blend of datasets (`--data-path 0.3 pathA 0.7 pathB`), Megatron-compatible.

Sample i of the blend is sample `dataset_sample_index[i]` of dataset `dataset_index[i]`, chosen
by Megatron's greedy rule (the dataset whose share lags its weight the most; see
`blending_kernel.py`), so that every prefix of the blend - any number of training steps - holds
each dataset in proportion to its weight, to within one sample. Within each dataset, samples are
taken in order 0, 1, 2, ...: the component datasets are already shuffled.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from megatron.core.datasets.blending_kernel import build_blending_indices
from megatron.core.datasets.dataset_config import GPTDatasetConfig
from megatron.core.datasets.helpers import normalize_weights
from megatron.core.datasets.index_cache import (
    cache_key,
    load_arrays,
    memmaps_to_names,
    names_to_memmaps,
    save_arrays,
    writable_directory,
)

logger = logging.getLogger(__name__)

INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here).

    Attributes:
        dataset_index         int16 [size]  which dataset serves each sample
        dataset_sample_index  int64 [size]  which sample of that dataset

    Items are the component's sample dict plus "dataset_id" (int64 scalar), as in Megatron.
    The indices are cached under config.path_to_cache when every component is cached itself.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int, config: GPTDatasetConfig) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"a blend needs one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"--data-path weights must be positive, got {list(weights)}")
        if size < 0:
            raise ValueError(f"blend size must be non-negative, got {size}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.config = config
        self.cache_key = self._cache_key()
        self.dataset_index, self.dataset_sample_index = self._load_or_build_indices()
        drawn = np.bincount(self.dataset_index, minlength=len(self.datasets)) if self.size else np.zeros(len(self.datasets), int)
        for k, (count, dataset) in enumerate(zip(drawn, self.datasets)):
            if count > len(dataset):
                raise ValueError(
                    f"blend of {self.size} samples needs {count} samples of dataset {k} (weight {self.weights[k]:.6g}) "
                    f"but it has {len(dataset)}; build it with helpers.blend_dataset_sizes"
                )

    def _cache_key(self) -> Optional[str]:
        keys = [getattr(d, "cache_key", None) for d in self.datasets]
        if self.config.path_to_cache is None or any(k is None for k in keys):
            return None
        return cache_key({"class": "BlendedDataset", "weights": [repr(w) for w in self.weights], "size": self.size, "datasets": keys})

    def _check_cached(self, arrays: dict[str, np.ndarray]) -> Optional[str]:
        dataset_index, sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        if dataset_index.shape != (self.size,) or dataset_index.dtype != np.int16:
            return f"dataset_index is {dataset_index.dtype}{list(dataset_index.shape)}, expected int16[{self.size}]"
        if sample_index.shape != (self.size,) or sample_index.dtype != np.int64:
            return f"dataset_sample_index is {sample_index.dtype}{list(sample_index.shape)}, expected int64[{self.size}]"
        if self.size and (dataset_index.min() < 0 or dataset_index.max() >= len(self.datasets) or sample_index.min() < 0):
            return "indices out of range"
        return None

    def _load_or_build_indices(self) -> tuple[np.ndarray, np.ndarray]:
        directory = self.config.path_to_cache if self.cache_key is not None else None
        if directory is not None:
            if not writable_directory(directory):
                raise ValueError(f"--data-cache-path {directory!r} cannot be created or written")
            cached = load_arrays(directory, self.cache_key, INDEX_NAMES, self._check_cached)
            if cached is not None:
                return cached["dataset_index"], cached["dataset_sample_index"]
        dataset_index, sample_index = build_blending_indices(np.asarray(self.weights), self.size)
        if directory is not None:
            description = {"class": "BlendedDataset", "weights": self.weights, "size": self.size,
                           "datasets": [d.cache_key for d in self.datasets]}
            try:
                save_arrays(directory, self.cache_key, dict(zip(INDEX_NAMES, (dataset_index, sample_index))), description)
            except OSError as exc:  # e.g. disk full: train on, uncached
                logger.warning("could not cache blend indices in %s: %s", directory, exc)
        return dataset_index, sample_index

    def __getstate__(self) -> dict[str, Any]:
        """Cached indices are pickled by file name (see index_cache.memmaps_to_names)."""
        return memmaps_to_names(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(names_to_memmaps(state))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} samples")
        dataset_id = int(self.dataset_index[idx])
        return {"dataset_id": np.int64(dataset_id), **self.datasets[dataset_id][int(self.dataset_sample_index[idx])]}
