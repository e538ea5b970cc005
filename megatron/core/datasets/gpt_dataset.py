"""GPT pre-training dataset over one indexed dataset (or mock data), Megatron-compatible.

A GPTDataset takes the documents [begin, end) of one `.bin/.idx` pair (its split), repeats them
for enough epochs to cover the requested number of samples, shuffles that document order (all
epochs as one block, a short final epoch apart, as Megatron), concatenates the documents and cuts
the stream into windows of seq_length + 1 tokens that overlap by one token, spanning document
boundaries; then it shuffles the windows. The numerics are in `helpers.py`
(vectorised, identical to Megatron-LM's); the three indices are cached on disk
(`index_cache.py`), keyed by everything that determines them.

Sample `i` is a dict of numpy arrays (the DataLoader's collate turns them into torch tensors):
    tokens        int64   [seq_length]   input ids
    labels        int64   [seq_length]   tokens shifted by one
    loss_mask     float32 [seq_length]   0 where the input token is eod (with eod_mask_loss, as
                                         Megatron: do not predict across a document boundary)
    position_ids  int64   [seq_length]   restart at 0 after each eod with reset_position_ids
    attention_mask bool [1, seq_length, seq_length]  only with reset_attention_mask; True means
                                         masked out (causal, and no attention across an eod)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from megatron.core.datasets import helpers
from megatron.core.datasets.dataset_config import GPTDatasetConfig
from megatron.core.datasets.index_cache import (
    cache_key,
    file_fingerprint,
    index_cache_directory,
    load_arrays,
    memmaps_to_names,
    names_to_memmaps,
    save_arrays,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, data_file_path, index_file_path

logger = logging.getLogger(__name__)

INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
# Bump when the index algorithm changes, so old caches are not reused.
GPT_INDEX_VERSION = 1


@dataclass(frozen=True)
class _ReopenIndexed:
    """Stands for the IndexedDataset of a pickled GPTDataset."""

    prefix: str


class LowLevelDataset(Protocol):
    """What a GPTDataset reads: IndexedDataset, or MockGPTLowLevelDataset."""

    sequence_lengths: np.ndarray  # int32 [S]: tokens per sequence (the GPT "document")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray: ...


def gpt_sample(
    text: np.ndarray,
    eod_token_id: Optional[int],
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> dict[str, np.ndarray]:
    """seq_length + 1 token ids -> the training dict described in the module docstring.

    Vectorised equivalent of Megatron's `_get_ltor_masks_and_position_ids`: a position's segment
    starts right after the last eod before it; positions count from that start, and attention is
    allowed only to earlier positions of the same segment.
    """
    text = np.asarray(text, dtype=np.int64)
    tokens = text[:-1].copy()
    labels = text[1:].copy()
    length = tokens.shape[0]
    loss_mask = np.ones(length, dtype=np.float32)
    position_ids = np.arange(length, dtype=np.int64)
    sample = {"tokens": tokens, "labels": labels}
    if eod_mask_loss:
        loss_mask[tokens == eod_token_id] = 0.0
    if reset_position_ids or reset_attention_mask:
        after_eod = np.zeros(length, dtype=np.int64)
        after_eod[1:] = np.where(tokens[:-1] == eod_token_id, np.arange(1, length), 0)
        segment_start = np.maximum.accumulate(after_eod)  # int64 [L]
        if reset_position_ids:
            position_ids = position_ids - segment_start
        if reset_attention_mask:
            q = np.arange(length)
            allowed = (q[None, :] <= q[:, None]) & (segment_start[None, :] == segment_start[:, None])
            sample["attention_mask"] = ~allowed[None]
    sample["loss_mask"] = loss_mask
    sample["position_ids"] = position_ids
    return sample


class GPTDataset:
    """Samples of seq_length + 1 tokens over documents [begin, end) of one low-level dataset.

    Args:
        dataset: an IndexedDataset (indices cached next to it or under config.path_to_cache)
            or any LowLevelDataset (indices kept in memory).
        document_range: (begin, end) sequence ids of this split.
        num_samples: samples wanted (epochs are added to cover them; len() may be larger), or
            None for exactly one epoch.
        config: the dataset config (seed, seq length, masks, cache path).
        split_name: "train" / "valid" / "test", for messages and the cache description.

    Attributes (shapes in `helpers.GPTIndexPlan`): document_index, sample_index, shuffle_index.
    """

    def __init__(
        self,
        dataset: LowLevelDataset,
        document_range: tuple[int, int],
        num_samples: Optional[int],
        config: GPTDatasetConfig,
        split_name: str = "train",
    ) -> None:
        begin, end = (int(document_range[0]), int(document_range[1]))
        num_sequences = len(dataset.sequence_lengths)
        if not 0 <= begin <= end <= num_sequences:
            raise ValueError(f"document range [{begin}, {end}) is outside the dataset's {num_sequences} documents")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"number of samples must be non-negative, got {num_samples}")
        self.dataset = dataset
        self.document_range = (begin, end)
        self.num_samples = num_samples
        self.config = config
        self.split_name = split_name
        self.plan = helpers.plan_gpt_indices(
            np.asarray(dataset.sequence_lengths), self.document_range, num_samples, config.sequence_length
        )
        self.description = self._description()
        self.cache_key = cache_key(self.description) if self.description is not None else None
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build_indices()

    # ---- indices ---------------------------------------------------------------------------

    def _description(self) -> Optional[dict[str, Any]]:
        """Everything that determines the indices, or None when they are not cached (no files)."""
        prefix = getattr(self.dataset, "prefix", None)
        if prefix is None:
            return None
        return {
            "class": "GPTDataset",
            "index_version": GPT_INDEX_VERSION,
            "idx": file_fingerprint(index_file_path(prefix)),
            "bin": file_fingerprint(data_file_path(prefix)),
            "document_range": list(self.document_range),
            "random_seed": self.config.random_seed,
            "sequence_length": self.config.sequence_length,
            "num_samples": self.num_samples,
            "extra_tokens": helpers.EXTRA_TOKENS,
        }

    def _cache_directory(self) -> Optional[str]:
        if self.description is None:
            return None
        return index_cache_directory(self.dataset.prefix, self.config.path_to_cache)

    def _check_cached(self, arrays: dict[str, np.ndarray]) -> Optional[str]:
        return helpers.check_gpt_indices(self.plan, self.document_range, *(arrays[name] for name in INDEX_NAMES))

    def _load_or_build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        directory = self._cache_directory()
        if directory is not None:
            cached = load_arrays(directory, self.cache_key, INDEX_NAMES, self._check_cached)
            if cached is not None:
                return tuple(cached[name] for name in INDEX_NAMES)  # type: ignore[return-value]
        document_index, sample_index, shuffle_index, plan = helpers.build_gpt_indices(
            np.asarray(self.dataset.sequence_lengths),
            self.document_range,
            self.num_samples,
            self.config.sequence_length,
            self.config.random_seed,
        )
        assert plan == self.plan
        if directory is not None:
            arrays = dict(zip(INDEX_NAMES, (document_index, sample_index, shuffle_index)))
            try:
                save_arrays(directory, self.cache_key, arrays, {**self.description, "split": self.split_name})
            except OSError as exc:  # e.g. disk full: train on, uncached
                logger.warning("could not cache GPT indices in %s: %s", directory, exc)
        return document_index, sample_index, shuffle_index

    # ---- pickling (DataLoader workers under spawn / forkserver) --------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle memory-mapped files by name, not by content: a worker re-opens the `.bin/.idx`
        pair and the cached indices instead of receiving gigabytes through a pipe."""
        state = memmaps_to_names(self.__dict__)
        if isinstance(self.dataset, IndexedDataset):
            state["dataset"] = _ReopenIndexed(self.dataset.prefix)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = names_to_memmaps(state)
        if isinstance(state["dataset"], _ReopenIndexed):
            state["dataset"] = IndexedDataset(state["dataset"].prefix)
        self.__dict__.update(state)

    # ---- samples ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.plan.num_samples

    def sample_tokens(self, sample: int) -> np.ndarray:
        """int64 [seq_length + 1]: the tokens of unshuffled sample `sample` (document order)."""
        (begin_pos, begin_offset), (end_pos, end_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        begin_pos, begin_offset, end_pos, end_offset = int(begin_pos), int(begin_offset), int(end_pos), int(end_offset)
        extra = helpers.EXTRA_TOKENS
        if begin_pos == end_pos:
            doc = int(self.document_index[begin_pos])
            return self.dataset.get(doc, begin_offset, end_offset - begin_offset + extra).astype(np.int64)
        parts = []
        for pos in range(begin_pos, end_pos + 1):
            doc = int(self.document_index[pos])
            offset = begin_offset if pos == begin_pos else 0
            length = end_offset + extra if pos == end_pos else None
            parts.append(self.dataset.get(doc, offset, length))
        return np.concatenate(parts).astype(np.int64, copy=False)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a {self.split_name} dataset of {len(self)} samples")
        text = self.sample_tokens(int(self.shuffle_index[idx]))
        cfg = self.config
        return gpt_sample(text, cfg.eod, cfg.reset_position_ids, cfg.reset_attention_mask, cfg.eod_mask_loss)


class MockGPTLowLevelDataset:
    """Deterministic pseudo-random documents, no files (`--mock-data`).

    Document i has 1..max_document_length tokens (lengths drawn from the seed); its tokens are
    drawn from a generator seeded by (seed, i), from [0, vocab_size) without eod, and its last
    token is eod. Nothing is stored, so any number of documents costs 4 bytes each.
    """

    def __init__(self, seed: int, num_documents: int, max_document_length: int, vocab_size: int, eod: int) -> None:
        self.seed = seed
        self.vocab_size = vocab_size
        self.eod = eod
        self.dtype = np.dtype(np.int64)
        self.sequence_lengths = np.random.default_rng(seed).integers(
            1, max_document_length + 1, size=num_documents, dtype=np.int32
        )
        self.document_indices = np.arange(num_documents + 1, dtype=np.int64)

    @classmethod
    def from_config(cls, config: GPTDatasetConfig) -> "MockGPTLowLevelDataset":
        return cls(config.random_seed, config.mock_num_documents, config.mock_max_document_length,
                   config.vocab_size, config.eod)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        ids = np.random.default_rng((self.seed, int(idx))).integers(0, self.vocab_size - 1, size=length - 1)
        ids += ids >= self.eod  # skip the eod id
        return np.concatenate([ids, [self.eod]]).astype(np.int64)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        doc = self[idx]
        if length is None:
            length = len(doc) - offset
        if offset < 0 or length < 0 or offset + length > len(doc):
            raise IndexError(f"slice [{offset}, {offset + length}) outside mock document {idx} of length {len(doc)}")
        return doc[offset : offset + length]


class MockGPTDataset(GPTDataset):
    """A GPTDataset over MockGPTLowLevelDataset: same samples dict, indices never cached."""

    def _description(self) -> Optional[dict[str, Any]]:
        return None
