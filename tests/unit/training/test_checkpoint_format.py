"""The data files and the reader of checkpoint_format in isolation: the staged write path (what
device tensors take) writes the same bytes and checksums as the direct one; reads through tiny
buffers split spans, verify partly covered blocks once, cast dtypes and fill strided sub-boxes."""

from __future__ import annotations

import json

import pytest
import torch

from megatron.training.checkpoint_format import (
    FORMAT, CheckpointReader, DataFileWriter, read_index, sha256_text, write_index,
)
from megatron.training.checkpoint_io import CheckpointError, atomic_write_text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_staged_writes_equal_direct_writes(tmp_path, dtype):
    flat = (torch.randn(1000) * 100).to(dtype)
    direct = DataFileWriter(str(tmp_path / "a.bin"), block_bytes=333)
    staged = DataFileWriter(str(tmp_path / "b.bin"), block_bytes=333, staging_bytes=40)  # many small chunks
    assert direct.write(flat, 10, 500) == 0 and direct.write(flat, 600, 7) == 500 * flat.element_size()
    staged.write_staged(flat[10:510])
    staged.write_staged(flat[600:607])
    a, b = direct.close(), staged.close()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert a["blocks"] == b["blocks"] and a["sha256"] == b["sha256"] and a["bytes"] == 507 * flat.element_size()
    assert len(a["blocks"]) == -(-a["bytes"] // 333)


def _single_tensor_checkpoint(tmp_path, full: torch.Tensor, boxes, block_bytes=100):
    """Store `full` as the given boxes ((offsets, sizes) each) in one data file with an index."""
    writer = DataFileWriter(str(tmp_path / "rank_00000.bin"), block_bytes=block_bytes)
    entries = []
    for off, size in boxes:
        part = full[tuple(slice(o, o + s) for o, s in zip(off, size))].contiguous().reshape(-1)
        entries.append([0, writer.write(part, 0, part.numel()), list(off), list(size)])
    body = {"format": FORMAT, "iteration": 1, "block_bytes": block_bytes, "files": [writer.close()], "aux_files": {},
            "tensors": {"t": {"dtype": str(full.dtype).split(".")[1], "shape": list(full.shape), "trainable": None,
                              "boxes": entries}}}
    write_index(str(tmp_path), body, atomic_write_text)
    return read_index(str(tmp_path))


def test_reads_through_tiny_buffers_cast_and_fill_strided_boxes(tmp_path):
    full = torch.arange(4 * 6 * 10, dtype=torch.float32).reshape(4, 6, 10)
    # Stored as two boxes split along dim 1 (a TP-split weight), requested as a box across both.
    index = _single_tensor_checkpoint(tmp_path, full.to(torch.bfloat16), [((0, 0, 0), (4, 3, 10)), ((0, 3, 0), (4, 3, 10))])
    for limit in (16, 64, 1 << 20):
        with CheckpointReader(index, buffer_bytes=limit) as reader:
            out = torch.zeros(3, 4, 7, dtype=torch.float64)
            assert reader.read_into("t", (1, 1, 2), (3, 4, 7), out) == 84
            assert torch.equal(out, full[1:4, 1:5, 2:9].double())
            strided = torch.zeros(4, 6, 20)[:, :, ::2]  # a non-contiguous destination
            assert reader.read_into("t", (0, 0, 0), (4, 6, 10), strided) == 240
            assert torch.equal(strided, full)
            assert reader.read_into("t", (0, 0, 0), (1, 1, 1), torch.zeros(1, 1, 1)) == 1


def test_a_corrupt_block_is_found_by_partial_reads(tmp_path):
    full = torch.arange(500, dtype=torch.float32)
    index = _single_tensor_checkpoint(tmp_path, full, [((0,), (500,))], block_bytes=128)
    data = tmp_path / "rank_00000.bin"
    raw = bytearray(data.read_bytes())
    raw[130] ^= 1  # block 1 = bytes [128, 256) = elements 32..63
    data.write_bytes(bytes(raw))
    with CheckpointReader(index, buffer_bytes=16) as reader:
        assert reader.read_into("t", (0,), (32,), torch.zeros(32)) == 32  # block 0 only: fine
        with pytest.raises(CheckpointError, match=r"rank_00000\.bin: checksum mismatch in bytes \[128, 256\) \(iteration 1\)"):
            reader.read_into("t", (40,), (1,), torch.zeros(1))  # one element of block 1: the whole block is checked
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            reader.verify_file(0)


def test_index_checksum_and_schema(tmp_path):
    index = _single_tensor_checkpoint(tmp_path, torch.ones(3, 3), [((0, 0), (3, 3))])
    assert index.tensors["t"].shape == (3, 3) and index.iteration == 1
    outer = json.loads((tmp_path / "index.json").read_text())
    assert outer["sha256"] == sha256_text(json.dumps(outer["index"], sort_keys=True, separators=(",", ":")))
    outer["index"]["tensors"]["t"]["boxes"][0][3] = [3, 4]
    (tmp_path / "index.json").write_text(json.dumps(outer))
    with pytest.raises(CheckpointError, match="checksum mismatch: the index is corrupt"):
        read_index(str(tmp_path))
