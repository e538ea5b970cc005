"""Index-building numerics of the GPT pre-training datasets, vectorised in numpy.

Everything here is a pure function of its arguments, so that the indices (and therefore the
order in which a run sees its data) are a deterministic function of the flags and the data.
The algorithms reproduce Megatron-LM's (`megatron/core/datasets/gpt_dataset.py`,
`blended_megatron_dataset_builder.py` and the C++ `helpers.cpp`) call for call, so that the
same seed, data and flags give the same samples in the same order:

* the unit of a GPT dataset is the *sequence* of the indexed dataset (Megatron's
  `numel_low_level_dataset` is `len(sequence_lengths)`); with document-level data, which is what
  `preprocess_data.py` writes without `--split-sentences`, a sequence is a document;
* the document order of all epochs is shuffled as one block with `numpy.random.RandomState(seed)`,
  except a final epoch that contributes less than 80% of an epoch's samples, which is shuffled
  on its own (so the partial epoch is a uniform draw, not biased towards one region);
* sample i is the window of `seq_length + 1` tokens starting at token `i * seq_length` of the
  concatenation: consecutive samples overlap by one token (the last label of sample i is the
  first token of sample i + 1);
* the samples are then shuffled by the same random state.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Megatron's `add_extra_token_to_sequence`: a sample holds seq_length + 1 tokens (inputs + shifted labels).
EXTRA_TOKENS = 1
# A final epoch giving fewer than this fraction of an epoch's samples is shuffled separately.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# Megatron requests this much more from each dataset of a blend than its share, so the greedy
# blending (whose counts can run ahead of weight * n by up to one sample) never runs out.
BLEND_SIZE_MARGIN = 1.005
SPLIT_NAMES = ("train", "valid", "test")
# Samples per chunk when gathering the sample index: bounds temporaries to ~100 MB whatever the size.
_SAMPLE_INDEX_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------
# Splits (--split)
# --------------------------------------------------------------------------------------------


def parse_split(split: str) -> list[float]:
    """`--split "969,30,1"` -> normalised weights [train, valid, test] (missing ones are 0).

    Separators `,` or `/` (both accepted by Megatron). Raises ValueError naming `--split` for
    anything that is not up to three finite non-negative numbers with a positive sum.
    """
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"--split must be a string like '969,30,1', got {split!r}")
    parts = [p.strip() for p in re.split(r"[,/]", split.strip())]
    if len(parts) > len(SPLIT_NAMES):
        raise ValueError(f"--split takes at most {len(SPLIT_NAMES)} weights (train,valid,test), got {split!r}")
    weights = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--split weights must be numbers, got {part!r} in {split!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--split weights must be finite and non-negative, got {part!r} in {split!r}")
        weights.append(value)
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    if sum(weights) <= 0:
        raise ValueError(f"--split weights must not all be zero, got {split!r}")
    return normalize_weights(weights)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, in float64 exactly as Megatron's `normalize`."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def split_document_ranges(weights: Sequence[float], num_documents: int) -> list[Optional[tuple[int, int]]]:
    """Normalised split weights -> per split a document range [begin, end), or None (weight 0).

    As Megatron: the bookends are the running sums of the weights (0, w0, w0+w1, ...) and each is
    scaled by `num_documents` and rounded (Python's round, half to even). The final bookend is 1 up
    to float error; it is pinned to `num_documents` so the last non-empty split always ends there.
    """
    bookends = [0.0]
    for w in weights:
        bookends.append(bookends[-1] + w)
    last = max((i for i, w in enumerate(weights) if w > 0), default=-1)
    ranges: list[Optional[tuple[int, int]]] = []
    for i, (lo, hi) in enumerate(zip(bookends[:-1], bookends[1:])):
        if hi <= lo:
            ranges.append(None)
            continue
        begin = min(int(round(lo * float(num_documents))), num_documents)
        end = num_documents if i == last else min(int(round(hi * float(num_documents))), num_documents)
        ranges.append((begin, end))
    return ranges


# --------------------------------------------------------------------------------------------
# GPT indices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTIndexPlan:
    """Sizes and dtypes of the three GPT indices, known before building them (used to validate a
    cache file without trusting it).

    document_index: int32 [num_epochs * num_documents]
    sample_index:   sample_index_dtype [num_samples + 1, 2]   (position in document_index, offset)
    shuffle_index:  shuffle_index_dtype [num_samples]
    """

    num_documents: int
    tokens_per_epoch: int
    num_epochs: int
    separate_final_epoch: bool
    num_samples: int  # samples built (all epochs); >= the number requested
    num_samples_sans_final_epoch: int  # first block of the shuffle when the final epoch is separate
    sample_index_dtype: np.dtype
    shuffle_index_dtype: np.dtype

    @property
    def document_index_shape(self) -> tuple[int]:
        return (self.num_epochs * self.num_documents,)

    @property
    def sample_index_shape(self) -> tuple[int, int]:
        return (self.num_samples + 1, 2)

    @property
    def shuffle_index_shape(self) -> tuple[int]:
        return (self.num_samples,)


def num_epochs_for(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Fewest epochs whose tokens cover `num_samples` windows (num_samples * seq_length + 1 tokens)."""
    if num_samples is None or num_samples == 0:
        return 1
    if tokens_per_epoch <= 0:
        raise ValueError(f"cannot draw {num_samples} samples from documents holding no tokens")
    needed = num_samples * seq_length + EXTRA_TOKENS
    return max(1, -(-needed // tokens_per_epoch))


def plan_gpt_indices(
    sizes: np.ndarray, document_range: tuple[int, int], num_samples: Optional[int], seq_length: int
) -> GPTIndexPlan:
    """Work out epochs, sample count and dtypes for documents [begin, end) of `sizes` (int32 [S])."""
    begin, end = document_range
    num_documents = end - begin
    tokens_per_epoch = int(np.sum(sizes[begin:end], dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length)
    total_tokens = num_epochs * tokens_per_epoch
    built = max(0, (total_tokens - EXTRA_TOKENS) // seq_length)
    separate = False
    sans_final = built
    if num_epochs > 1:
        assert num_samples is not None
        sans_final = ((num_epochs - 1) * tokens_per_epoch - EXTRA_TOKENS) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - EXTRA_TOKENS) // seq_length
        separate = from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
        if not separate:
            sans_final = built
    max_size = int(sizes[begin:end].max()) if num_documents else 0
    int32_max = np.iinfo(np.int32).max
    sample_dtype = np.dtype(np.int32 if max(num_epochs * num_documents, max_size) <= int32_max else np.int64)
    shuffle_dtype = np.dtype(np.uint32 if built < np.iinfo(np.uint32).max - 1 else np.int64)
    return GPTIndexPlan(
        num_documents=num_documents,
        tokens_per_epoch=tokens_per_epoch,
        num_epochs=num_epochs,
        separate_final_epoch=separate,
        num_samples=built,
        num_samples_sans_final_epoch=sans_final,
        sample_index_dtype=sample_dtype,
        shuffle_index_dtype=shuffle_dtype,
    )


def build_document_index(
    documents: np.ndarray, num_epochs: int, random_state: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """int32 [num_epochs * len(documents)]: the documents of every epoch, shuffled.

    All epochs are shuffled together as one block (Megatron), except that a separated final epoch
    is shuffled on its own and appended. Consumes the random state exactly as Megatron does.
    """
    documents = np.asarray(documents, dtype=np.int32)
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(documents, num_epochs)
        random_state.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, random_state, False)
    last = build_document_index(documents, 1, random_state, False)
    return np.concatenate((first, last))


def build_sample_index(
    sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int, dtype: np.dtype
) -> np.ndarray:
    """[num_samples + 1, 2]: where each sample starts, as (position in document_index, offset).

    Sample i covers tokens [i * seq_length, i * seq_length + seq_length] (inclusive) of the
    concatenated documents, so its end is row i + 1. Row r (r >= 1) is the document holding token
    r * seq_length: the first position whose running token count exceeds it (empty documents are
    skipped) - a cumulative sum and a binary search, the same rows as Megatron's sequential walk.
    Row 0 is (0, 0), as in Megatron even when the first document is empty.
    """
    doc_sizes = np.asarray(sizes)[document_index]  # int32 [E*D]
    ends = np.cumsum(doc_sizes, dtype=np.int64)  # int64 [E*D]: tokens up to and including each position
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    for lo in range(1, num_samples + 1, _SAMPLE_INDEX_CHUNK):
        hi = min(num_samples + 1, lo + _SAMPLE_INDEX_CHUNK)
        token = np.arange(lo, hi, dtype=np.int64) * seq_length
        position = np.searchsorted(ends, token, side="right")
        out[lo:hi, 0] = position
        out[lo:hi, 1] = token - (ends[position] - doc_sizes[position])
    return out


def build_shuffle_index(
    num_samples: int, total_size: int, random_state: np.random.RandomState, dtype: np.dtype
) -> np.ndarray:
    """[total_size]: a permutation of the samples; [0, num_samples) and [num_samples, total_size)
    are shuffled separately (the second block is the separated final epoch, if any)."""
    first = np.arange(num_samples, dtype=dtype)
    random_state.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    random_state.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sizes: np.ndarray, document_range: tuple[int, int], num_samples: Optional[int], seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, GPTIndexPlan]:
    """The three GPT indices (document, sample, shuffle; shapes in `GPTIndexPlan`) for documents
    [begin, end) of `sizes` (tokens per document, int32 [S]) and at least `num_samples` samples
    (None: one epoch), plus the plan that sized them."""
    plan = plan_gpt_indices(sizes, document_range, num_samples, seq_length)
    random_state = np.random.RandomState(seed)
    documents = np.arange(document_range[0], document_range[1], dtype=np.int32)
    document_index = build_document_index(documents, plan.num_epochs, random_state, plan.separate_final_epoch)
    sample_index = build_sample_index(sizes, document_index, seq_length, plan.num_samples, plan.sample_index_dtype)
    shuffle_index = build_shuffle_index(
        plan.num_samples_sans_final_epoch, plan.num_samples, random_state, plan.shuffle_index_dtype
    )
    return document_index, sample_index, shuffle_index, plan


def check_gpt_indices(
    plan: GPTIndexPlan,
    document_range: tuple[int, int],
    document_index: np.ndarray,
    sample_index: np.ndarray,
    shuffle_index: np.ndarray,
) -> Optional[str]:
    """None if the three arrays have the planned shapes and dtypes and in-range values, else why
    not. Used on cache files, which another process may have left truncated or garbled."""
    for name, arr, shape, dtype in (
        ("document_index", document_index, plan.document_index_shape, np.dtype(np.int32)),
        ("sample_index", sample_index, plan.sample_index_shape, plan.sample_index_dtype),
        ("shuffle_index", shuffle_index, plan.shuffle_index_shape, plan.shuffle_index_dtype),
    ):
        if arr.shape != shape or arr.dtype != dtype:
            return f"{name} is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}"
    if document_index.size and (
        document_index.min() < document_range[0] or document_index.max() >= document_range[1]
    ):
        return "document_index holds documents outside the split"
    positions = sample_index[:, 0]
    if np.any(positions < 0) or np.any(positions >= max(1, document_index.size)) or np.any(np.diff(positions) < 0):
        return "sample_index positions out of range or not monotonic"
    if np.any(sample_index[:, 1] < 0):
        return "sample_index holds negative offsets"
    if shuffle_index.size and (shuffle_index.min() < 0 or shuffle_index.max() >= plan.num_samples):
        return "shuffle_index out of range"
    return None


# --------------------------------------------------------------------------------------------
# Blends (--data-path w1 p1 w2 p2 ...)
# --------------------------------------------------------------------------------------------


def blend_dataset_sizes(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples to request from each dataset of a blend of `num_samples`: weight * n * 1.005,
    rounded up (Megatron's margin, so the blend never asks a dataset for more than it built)."""
    return [int(math.ceil(w * num_samples * BLEND_SIZE_MARGIN)) for w in normalize_weights(weights)]
