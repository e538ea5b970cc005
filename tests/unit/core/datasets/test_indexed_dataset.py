"""The .bin/.idx writer and reader: byte layout, golden files, validation of broken files."""

import filecmp
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    optimal_dtype,
)

GOLDEN = Path(__file__).resolve().parents[3] / "data" / "golden" / "preprocess"


def build(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(str(prefix), dtype=dtype)
    for doc in docs:
        b.add_document(doc)
    b.finalize()
    return str(prefix)


def test_layout_by_hand(tmp_path):
    prefix = build(tmp_path / "d", [[[1, 2, 3], [4]], [], [[5, 6]]], dtype=np.uint16)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, seqs, docs = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, seqs, docs) == (1, 8, 3, 4)
    lengths = np.frombuffer(raw, np.int32, 3, 34)
    pointers = np.frombuffer(raw, np.int64, 3, 34 + 12)
    doc_idx = np.frombuffer(raw, np.int64, 4, 34 + 12 + 24)
    assert lengths.tolist() == [3, 1, 2]
    assert pointers.tolist() == [0, 6, 8]  # bytes: uint16 itemsize 2
    assert doc_idx.tolist() == [0, 2, 2, 3]  # the empty document still closes a document
    assert len(raw) == 34 + 12 + 24 + 32
    assert np.fromfile(prefix + ".bin", np.uint16).tolist() == [1, 2, 3, 4, 5, 6]
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.num_documents == 3
    assert ds[0].tolist() == [1, 2, 3] and ds.get(2, 1, 1).tolist() == [6]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)


def test_dtype_choice():
    assert optimal_dtype(4096) is np.uint16
    assert optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(129280) is np.int32


@pytest.mark.parametrize("name", ["hf_eod_text_document", "gpt2bpe_eod_text_document"])
def test_rewriting_golden_is_byte_identical(tmp_path, name):
    src = IndexedDataset(str(GOLDEN / name))
    docs = [
        [src[j] for j in range(src.document_indices[i], src.document_indices[i + 1])] for i in range(src.num_documents)
    ]
    out = build(tmp_path / "copy", docs, dtype=src.dtype)
    assert filecmp.cmp(out + ".idx", GOLDEN / (name + ".idx"), shallow=False)
    assert filecmp.cmp(out + ".bin", GOLDEN / (name + ".bin"), shallow=False)
    merged = IndexedDatasetBuilder(str(tmp_path / "merged"), dtype=src.dtype)
    merged.add_index(str(GOLDEN / name))
    merged.finalize()
    assert filecmp.cmp(str(tmp_path / "merged.idx"), GOLDEN / (name + ".idx"), shallow=False)


def test_merge_offsets_document_indices(tmp_path):
    a = build(tmp_path / "a", [[[1, 2]], [[3], [4, 5]]])
    b = build(tmp_path / "b", [[[6]], [[7, 8, 9]]])
    m = IndexedDatasetBuilder(str(tmp_path / "m"), dtype=np.uint16)
    m.add_index(a)
    m.add_index(b)
    m.finalize()
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.document_indices.tolist() == [0, 1, 3, 4, 5]
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5], [6], [7, 8, 9]]
    c = build(tmp_path / "c", [[[1]]], dtype=np.int32)
    m2 = IndexedDatasetBuilder(str(tmp_path / "m2"), dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match="dtype"):
        m2.add_index(c)
    m2.abort()


def test_add_raw_equals_add_document(tmp_path):
    docs = [[[1, 2], [3]], [[4, 5, 6]], []]
    ref = build(tmp_path / "ref", docs)
    b = IndexedDatasetBuilder(str(tmp_path / "raw"), dtype=np.uint16)
    b.add_raw(np.array([1, 2, 3], np.uint16).tobytes(), np.array([2, 1]), np.array([2]))
    b.add_raw(np.array([4, 5, 6], np.uint16).tobytes(), np.array([3]), np.array([1, 1]))
    b.finalize()
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(ref + ext, str(tmp_path / "raw") + ext, shallow=False)


def test_unfinished_builder_leaves_no_pair(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x"), dtype=np.uint16)
    b.add_document([[1, 2, 3]])
    assert not IndexedDataset.exists(str(tmp_path / "x"))
    b.abort()
    assert os.listdir(tmp_path) == []


def test_clear_errors_for_broken_files(tmp_path):
    prefix = build(tmp_path / "d", [[[1, 2, 3]], [[4, 5]]])
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(str(tmp_path / "missing"))
    # .bin truncated
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(prefix)
    open(prefix + ".bin", "wb").write(data)
    idx = open(prefix + ".idx", "rb").read()
    # index truncated
    open(prefix + ".idx", "wb").write(idx[:-5])
    with pytest.raises(IndexedDatasetError, match="truncated or corrupt"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:20])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(prefix)
    # foreign file
    open(prefix + ".idx", "wb").write(b"PK\x03\x04" + idx[4:])
    with pytest.raises(IndexedDatasetError, match="magic"):
        IndexedDataset(prefix)
    # wrong version / dtype code
    open(prefix + ".idx", "wb").write(idx[:9] + struct.pack("<Q", 2) + idx[17:])
    with pytest.raises(IndexedDatasetError, match="version"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:17] + bytes([42]) + idx[18:])
    with pytest.raises(IndexedDatasetError, match="dtype code"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx)
    assert IndexedDataset(prefix)[1].tolist() == [4, 5]
