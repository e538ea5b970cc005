"""Validation at open: an index whose pointers, lengths or document indices disagree with each
other or with the .bin is an error naming the file; token ids beyond the model's vocabulary are
found before training, by a scan that is cached."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from megatron.core.datasets import token_range
from megatron.core.datasets.dataset_builder import build_train_valid_test_datasets
from megatron.core.datasets.dataset_config import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError

HEADER = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8


def build(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(str(prefix), dtype=dtype)
    for doc in docs:
        b.add_document(doc)
    b.finalize()
    return str(prefix)


def edit_index(prefix, seqs, docs, lengths=None, pointers=None, doc_idx=None):
    """Overwrite arrays of the .idx in place (same size), as a corrupting tool or bit flip would."""
    raw = bytearray(open(prefix + ".idx", "rb").read())
    for array, offset, dtype in ((lengths, HEADER, np.int32), (pointers, HEADER + 4 * seqs, np.int64),
                                 (doc_idx, HEADER + 12 * seqs, np.int64)):
        if array is not None:
            data = np.asarray(array, dtype=dtype).tobytes()
            raw[offset:offset + len(data)] = data
    open(prefix + ".idx", "wb").write(bytes(raw))


@pytest.fixture
def pair(tmp_path):
    # 4 sequences of 3, 2, 4, 1 tokens (uint16: byte pointers 0, 6, 10, 18), documents [0, 2, 3, 4]
    return build(tmp_path / "d", [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]], [[10]]])


def error(prefix) -> str:
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(prefix)
    return str(err.value)


def test_valid_pair_opens(pair):
    ds = IndexedDataset(pair)
    assert ds.sequence_pointers.tolist() == [0, 6, 10, 18] and ds[2].tolist() == [6, 7, 8, 9]


def test_pointers_set_to_zero(pair):
    edit_index(pair, 4, 4, pointers=[0, 0, 0, 0])
    assert error(pair) == (
        f"{pair}.idx: sequence 1 starts at byte 0 of the .bin but the lengths before it put it at byte 6 "
        "(pointers and lengths disagree); the index is corrupt: rebuild it with tools/preprocess_data.py"
    )


def test_lengths_shifted_by_1000(pair):
    # the total is unchanged, so the .bin size still matches: only the pointer check can tell
    edit_index(pair, 4, 4, lengths=[3, 1002, 4, -999])
    assert error(pair) == (
        f"{pair}.idx: sequence 3 has negative length -999; the index is corrupt: rebuild it with tools/preprocess_data.py"
    )
    edit_index(pair, 4, 4, lengths=[1003, 2, 4, 1], pointers=[0, 2006, 2010, 2018])
    assert error(pair) == (
        f"{pair}.bin: 20 bytes, but the index describes 2020 bytes; the .bin is truncated or belongs to another "
        "index: rebuild it with tools/preprocess_data.py"
    )
    edit_index(pair, 4, 4, lengths=[3, 1002, 4, 1], pointers=[0, 6, 10, 18])
    assert "sequence 2 starts at byte 10 of the .bin but the lengths before it put it at byte 2010" in error(pair)


def test_pointer_past_the_end(pair):
    edit_index(pair, 4, 4, pointers=[0, 6, 10, 1 << 40])
    assert error(pair) == (
        f"{pair}.idx: sequence 3 starts at byte 1099511627776 of the .bin but the lengths before it put it at byte "
        "18 (pointers and lengths disagree); the index is corrupt: rebuild it with tools/preprocess_data.py"
    )


def test_document_indices(pair):
    edit_index(pair, 4, 4, doc_idx=[0, 3, 2, 4])
    assert error(pair) == (
        f"{pair}.idx: document indices decrease at document 1 (3 then 2); the index is corrupt: rebuild it with "
        "tools/preprocess_data.py"
    )
    edit_index(pair, 4, 4, doc_idx=[0, 2, 3, 9])
    assert error(pair) == (
        f"{pair}.idx: document indices run from 0 to 9 but must run from 0 to the 4 sequences; the index is "
        "corrupt: rebuild it with tools/preprocess_data.py"
    )


def test_scan_token_range_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(-5, 3000, int(rng.integers(1, 50)))] for _ in range(200)]
    ds = IndexedDataset(build(tmp_path / "s", docs, dtype=np.int32))
    every = np.concatenate([d[0] for d in docs])
    assert token_range.scan_token_range(ds, chunk_tokens=7) == (int(every.min()), int(every.max()))
    empty = IndexedDataset(build(tmp_path / "e", [[]]))
    assert token_range.scan_token_range(empty) == (0, -1)


def _config(prefix, cache, vocab_size):
    return GPTDatasetConfig(random_seed=1, sequence_length=4, blend=((1.0, prefix),), split="1,0,0",
                            path_to_cache=str(cache), vocab_size=vocab_size)


def test_token_ids_beyond_the_vocabulary(tmp_path, monkeypatch):
    prefix = build(tmp_path / "v", [[[5, 9, 4999]], [[1, 2, 3, 4, 5, 6]]] * 10)
    with pytest.raises(ValueError) as err:
        build_train_valid_test_datasets(_config(prefix, tmp_path / "cache", 4096), (4, 0, 0))
    assert str(err.value) == (
        f"--data-path '{prefix}': {prefix}.bin: holds token id 4999, so the dataset was made with a tokenizer of at "
        "least 5000 ids, but the model's vocabulary is 4096: check --tokenizer-model (and --tokenizer-type) against "
        "the tokenizer the data was preprocessed with, or re-tokenize the data with tools/preprocess_data.py"
    )
    # the scan result is cached next to the index cache: the next start does not read the .bin
    assert len(glob.glob(str(tmp_path / "cache" / "*-token_range.json"))) == 1

    def no_rescan(*args, **kwargs):
        raise AssertionError("token range scanned again")

    monkeypatch.setattr(token_range, "scan_token_range", no_rescan)
    train, _, _ = build_train_valid_test_datasets(_config(prefix, tmp_path / "cache", 5000), (4, 0, 0))
    assert len(train) >= 4
    # a rebuilt pair (new inode and mtime) is scanned again
    build(tmp_path / "v", [[[1, 2, 3]]] * 20)
    with pytest.raises(AssertionError, match="scanned again"):
        build_train_valid_test_datasets(_config(prefix, tmp_path / "cache", 5000), (4, 0, 0))
    monkeypatch.undo()
    build_train_valid_test_datasets(_config(prefix, tmp_path / "cache", 4), (4, 0, 0))
    assert len(glob.glob(str(tmp_path / "cache" / "*-token_range.json"))) == 2
