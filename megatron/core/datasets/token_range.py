"""The range of token ids in a `.bin` checked against the model's vocabulary, cached.

Why: a dataset tokenized with another tokenizer (a larger vocabulary) trains until a batch hits an
id past the embedding, then fails deep in the model as `IndexError: index out of range in self`.
Scanning the `.bin` once at start-up turns that into an error naming the file and the flags to
check. The scan is vectorised over the memory map in chunks (a few GB/s from the page cache) and
its result cached next to the GPT index cache, keyed by the files' identity (path, size, mtime,
inode), so later starts only read a small JSON file.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Tuple

import numpy as np

from megatron.core.datasets.index_cache import atomic_write_text, cache_key, cache_path
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError, data_file_path, index_file_path

logger = logging.getLogger(__name__)

SCAN_CHUNK_TOKENS = 1 << 24  # tokens per vectorised step: 32-64 MB of the map at a time


def _identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def scan_token_range(dataset: IndexedDataset, chunk_tokens: int = SCAN_CHUNK_TOKENS) -> Tuple[int, int]:
    """(smallest, largest) token id in the dataset's `.bin`; (0, -1) when it holds no tokens."""
    tokens = np.frombuffer(dataset._bin_map, dtype=dataset.dtype)  # view over the whole map, no copy
    if tokens.size == 0:
        return 0, -1
    low, high = None, None
    signed = np.issubdtype(dataset.dtype, np.signedinteger) or np.issubdtype(dataset.dtype, np.floating)
    for begin in range(0, tokens.size, chunk_tokens):
        chunk = tokens[begin : begin + chunk_tokens]
        chunk_high = int(chunk.max())
        high = chunk_high if high is None else max(high, chunk_high)
        if signed:
            chunk_low = int(chunk.min())
            low = chunk_low if low is None else min(low, chunk_low)
    return (low if signed else 0), high


def _cache_file(directory: str, prefix: str) -> str:
    key = cache_key({"class": "TokenRange", "idx": _identity(index_file_path(prefix)),
                     "bin": _identity(data_file_path(prefix))})
    return cache_path(directory, key, "token_range", ".json")


def cached_token_range(dataset: IndexedDataset, cache_directory: Optional[str]) -> Tuple[int, int]:
    """`scan_token_range`, read from / written to `cache_directory` when one is given."""
    path = _cache_file(cache_directory, dataset.prefix) if cache_directory else None
    if path is not None and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            return int(cached["min"]), int(cached["max"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("rescanning token ids of %s: cache %s unreadable (%s)", dataset.prefix, path, exc)
    low, high = scan_token_range(dataset)
    if path is not None:
        try:
            atomic_write_text(path, json.dumps({"min": low, "max": high, "prefix": os.path.abspath(dataset.prefix)}))
        except OSError as exc:  # e.g. read-only or full: check again next time
            logger.warning("could not cache the token range of %s in %s: %s", dataset.prefix, cache_directory, exc)
    return low, high


def check_token_ids(dataset: IndexedDataset, vocab_size: int, cache_directory: Optional[str] = None) -> None:
    """Raise IndexedDatasetError unless every token id of `dataset` lies in [0, vocab_size)."""
    low, high = cached_token_range(dataset, cache_directory)
    bin_path = data_file_path(dataset.prefix)
    if high >= vocab_size:
        raise IndexedDatasetError(
            f"{bin_path}: holds token id {high}, so the dataset was made with a tokenizer of at least {high + 1} ids, "
            f"but the model's vocabulary is {vocab_size}: check --tokenizer-model (and --tokenizer-type) against the "
            f"tokenizer the data was preprocessed with, or re-tokenize the data with tools/preprocess_data.py"
        )
    if low < 0:
        raise IndexedDatasetError(
            f"{bin_path}: holds negative token id {low}; the .bin is corrupt: rebuild it with tools/preprocess_data.py"
        )
