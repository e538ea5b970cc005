"""Megatron's `.bin/.idx` indexed dataset: a streaming writer and a memory-mapped reader.

Byte layout (all little-endian; the format Megatron-LM's `tools/preprocess_data.py` writes):

    .idx:  b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence_count u64 |
           document_count u64 | sequence_lengths int32[S] | sequence_pointers int64[S] |
           document_indices int64[D] | (optional) sequence_modes int8[S]
    .bin:  all token ids of all sequences, concatenated, in the dtype above.

The writer keeps only the per-sequence lengths in memory (4 bytes per sequence), never the tokens,
so memory stays bounded whatever the corpus size. Files are written under temporary names and
committed together through `pair_files.commit_pair`, so no failure leaves a mismatched or
half-written pair that looks finished, and a reader refuses a pair being replaced.

The reader validates what training relies on (sizes, pointers, lengths, document indices) when
it opens a pair, so a corrupt index is an error naming the file instead of wrong samples.
"""

from __future__ import annotations

import os
import struct
import time
from typing import BinaryIO, Iterable, Optional, Sequence, Union

import numpy as np

from megatron.core.datasets.pair_files import commit_in_progress, commit_pair, prepare_prefix, tmp_path

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence_count, document_count

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair is missing, truncated, foreign or inconsistent."""


def dtype_code(dtype: Union[type, np.dtype]) -> int:
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset")


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's choice: uint16 when the vocabulary fits comfortably, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


REBUILD_HINT = "rebuild it with tools/preprocess_data.py"
_CHECK_CHUNK = 1 << 22  # sequences per chunk when checking pointers: bounds temporaries to ~64 MB


def sequence_pointers_for(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """int64[S] byte offset of each sequence in `.bin`: exclusive running sum of length * itemsize."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def _write_index_file(
    f: BinaryIO,
    dtype: Union[type, np.dtype],
    lengths: np.ndarray,
    doc_idx: np.ndarray,
    sequence_modes: Optional[np.ndarray] = None,
) -> None:
    pointers = sequence_pointers_for(lengths, np.dtype(dtype).itemsize)
    f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, dtype_code(dtype), len(lengths), len(doc_idx)))
    f.write(lengths.tobytes(order="C"))
    f.write(pointers.tobytes(order="C"))
    f.write(doc_idx.tobytes(order="C"))
    if sequence_modes is not None:
        f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes(order="C"))


def write_index(
    idx_path: str,
    dtype: Union[type, np.dtype],
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
    sequence_modes: Optional[np.ndarray] = None,
) -> None:
    """Write a lone `.idx` file atomically (temporary name, then rename); builders commit the
    `.idx` together with its `.bin` instead."""
    tmp = tmp_path(idx_path)
    try:
        with open(tmp, "wb") as f:
            _write_index_file(f, dtype, np.asarray(sequence_lengths, dtype=np.int32),
                              np.asarray(document_indices, dtype=np.int64), sequence_modes)
        os.replace(tmp, idx_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class IndexedDatasetBuilder:
    """Streams sequences into `<prefix>.bin` and writes `<prefix>.idx` on `finalize()`.

    Usage:
        builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
        builder.add_document([[1, 2, 3], [4, 5]])   # one document of two sequences (sentences)
        builder.finalize()                          # commits both files together

    Until `finalize()` both files live under temporary names; `abort()` removes them. Opening a
    builder first finishes an interrupted replacement of `prefix` and removes temporary files
    that dead processes left for it.
    """

    def __init__(self, prefix: str, dtype: Union[type, np.dtype] = np.int32) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early
        prepare_prefix(prefix)
        self._bin_path = data_file_path(prefix)
        self._bin_tmp = tmp_path(self._bin_path)
        self._idx_tmp = tmp_path(index_file_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []  # chunks of int32 lengths
        self._pending_lengths: list[int] = []
        self._doc_idx: list[int] = [0]
        self._num_sequences = 0
        self._num_tokens = 0
        self._finished = False

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def _flush_lengths(self) -> None:
        if self._pending_lengths:
            self._lengths.append(np.asarray(self._pending_lengths, dtype=np.int32))
            self._pending_lengths = []

    def add_sequence(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Append one sequence without closing the current document."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._pending_lengths.append(int(arr.size))
        self._num_sequences += 1
        self._num_tokens += int(arr.size)
        if len(self._pending_lengths) >= 65536:
            self._flush_lengths()

    def end_document(self) -> None:
        self._doc_idx.append(self._num_sequences)

    def add_document(self, sequences: Iterable[Union[Sequence[int], np.ndarray]]) -> None:
        """Append a document made of one or more sequences (e.g. sentences) and close it."""
        for seq in sequences:
            self.add_sequence(seq)
        self.end_document()

    def write_token_bytes(self, token_bytes: bytes) -> None:
        """Stream tokens of sequences that a later `add_raw(b"", lengths, ...)` describes (long
        documents are written piece by piece, never held whole)."""
        self._bin.write(token_bytes)

    def add_raw(self, token_bytes: Union[bytes, memoryview], lengths: np.ndarray, document_ends: np.ndarray) -> None:
        """Append pre-encoded tokens: `lengths` per sequence and, per document, the number of
        sequences it holds (`document_ends` are cumulative counts relative to this call)."""
        self._bin.write(token_bytes)
        self._flush_lengths()
        lengths = np.asarray(lengths, dtype=np.int32)
        self._lengths.append(lengths)
        base = self._num_sequences
        self._doc_idx.extend((np.asarray(document_ends, dtype=np.int64) + base).tolist())
        self._num_sequences += len(lengths)
        self._num_tokens += int(lengths.sum(dtype=np.int64))

    def add_index(self, other_prefix: str) -> None:
        """Append a whole existing dataset (same dtype), offsetting its document indices."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {other_prefix} (dtype {other.dtype}) into a dataset of dtype {self.dtype}"
            )
        base = self._num_sequences
        self._flush_lengths()
        self._lengths.append(np.asarray(other.sequence_lengths, dtype=np.int32))
        # document_indices of `other` start with 0; skip it, our list already ends at `base`.
        self._doc_idx.extend((other.document_indices[1:] + base).tolist())
        self._num_sequences += len(other)
        self._num_tokens += int(other.sequence_lengths.sum(dtype=np.int64))
        with open(data_file_path(other_prefix), "rb") as src:
            while True:
                chunk = src.read(1 << 24)
                if not chunk:
                    break
                self._bin.write(chunk)
        other.close()

    def finalize(self) -> None:
        """Close the `.bin`, write the `.idx` beside it, and commit both (`pair_files.commit_pair`).
        On any failure (e.g. a full disk) the temporaries are removed and the old pair, if any,
        is left as it was."""
        if self._finished:
            return
        try:
            self._flush_lengths()
            self._bin.close()
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
            expected = int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize
            written = os.path.getsize(self._bin_tmp)
            assert written == expected, f"{self._bin_tmp}: {written} bytes written, lengths describe {expected}"
            with open(self._idx_tmp, "wb") as f:
                _write_index_file(f, self.dtype, lengths, np.asarray(self._doc_idx, dtype=np.int64))
        except BaseException:
            self.abort()
            raise
        self._finished = True  # commit_pair owns the temporaries now (it removes them on failure)
        commit_pair(self.prefix, self._bin_tmp, self._idx_tmp)

    def abort(self) -> None:
        """Drop everything written so far (used when processing fails)."""
        if self._finished:
            return
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        self._finished = True


def _same_file(f: BinaryIO, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class IndexedDataset:
    """Memory-mapped reader of a `.bin/.idx` pair, validated on open.

    Attributes (numpy views into the mapped index):
        sequence_lengths  int32[S]   tokens per sequence
        sequence_pointers int64[S]   byte offset of each sequence in `.bin`
        document_indices  int64[D]   document boundaries in sequence units (starts with 0)
    `ds[i]` is sequence i as a numpy array; `ds.get(i, offset, length)` a slice of it.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        idx_file, bin_file = self._open_pair(idx_path, bin_path)
        try:
            self._read(idx_path, bin_path, idx_file, bin_file)
        finally:
            idx_file.close()
            bin_file.close()

    def _open_pair(self, idx_path: str, bin_path: str, attempts: int = 5) -> tuple[BinaryIO, BinaryIO]:
        """Open both files of one generation: no replacement in progress (no commit marker), and
        after both opens the paths still name the opened files, so a replacement that ran between
        the two opens is seen and the pair reopened."""
        for attempt in range(attempts):
            marker = commit_in_progress(self.prefix)
            if marker is None:
                files = []
                try:
                    for path in (idx_path, bin_path):
                        files.append(open(path, "rb"))
                except FileNotFoundError as exc:
                    for f in files:
                        f.close()
                    raise IndexedDatasetError(f"indexed dataset file not found: {exc.filename}") from None
                except IsADirectoryError as exc:
                    for f in files:
                        f.close()
                    raise IndexedDatasetError(f"indexed dataset file not found: {exc.filename} is a directory") from None
                marker = commit_in_progress(self.prefix)
                if marker is None and all(_same_file(f, path) for f, path in zip(files, (idx_path, bin_path))):
                    return files[0], files[1]
                for f in files:
                    f.close()
            if attempt + 1 < attempts:
                time.sleep(0.2 * (attempt + 1))
        raise IndexedDatasetError(
            f"{self.prefix}.bin/.idx are being replaced ({marker or 'files changed while opening'}); if no process "
            f"is writing them, an earlier write was interrupted: rerun the tool that wrote them "
            f"(tools/preprocess_data.py or tools/merge_datasets.py), which completes it"
        )

    def _read(self, idx_path: str, bin_path: str, idx_file: BinaryIO, bin_file: BinaryIO) -> None:
        idx_size = os.fstat(idx_file.fileno()).st_size
        if idx_size < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: truncated index ({idx_size} bytes, header needs {_HEADER.size})")
        magic, version, code, seq_count, doc_count = _HEADER.unpack(idx_file.read(_HEADER.size))
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx_path}: not a Megatron indexed dataset index (bad magic {magic!r})")
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + seq_count * (4 + 8) + doc_count * 8
        if idx_size not in (expected, expected + seq_count):  # optional int8 sequence_modes
            raise IndexedDatasetError(
                f"{idx_path}: index size {idx_size} bytes does not match its header "
                f"({seq_count} sequences, {doc_count} document entries need {expected} bytes); truncated or corrupt"
            )
        self._idx_map = np.memmap(idx_file, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx_map, dtype=np.int32, count=seq_count, offset=offset)
        offset += 4 * seq_count
        self.sequence_pointers = np.frombuffer(self._idx_map, dtype=np.int64, count=seq_count, offset=offset)
        offset += 8 * seq_count
        self.document_indices = np.frombuffer(self._idx_map, dtype=np.int64, count=doc_count, offset=offset)
        offset += 8 * doc_count
        self.sequence_modes = (
            np.frombuffer(self._idx_map, dtype=np.int8, count=seq_count, offset=offset) if idx_size > expected else None
        )
        bin_size = os.fstat(bin_file.fileno()).st_size
        self._validate(idx_path, bin_path, bin_size)
        self._bin_map = np.memmap(bin_file, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, dtype=np.uint8)

    def _validate(self, idx_path: str, bin_path: str, bin_size: int) -> None:
        """The index must describe the `.bin` exactly: lengths non-negative, pointers the running
        byte sum of the lengths (so monotone and in bounds), the lengths summing to the `.bin`
        size, document indices non-decreasing from 0 to the sequence count. Vectorised, in chunks
        of `_CHECK_CHUNK` sequences."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        seq_count, itemsize = len(lengths), self.dtype.itemsize
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != seq_count:
            first, last = (int(docs[0]), int(docs[-1])) if len(docs) else (None, None)
            raise IndexedDatasetError(
                f"{idx_path}: document indices run from {first} to {last} but must run from 0 to the {seq_count} "
                f"sequences; the index is corrupt: {REBUILD_HINT}"
            )
        steps = np.diff(docs)
        if steps.size and steps.min() < 0:
            bad = int(np.argmax(steps < 0))
            raise IndexedDatasetError(
                f"{idx_path}: document indices decrease at document {bad} ({int(docs[bad])} then {int(docs[bad + 1])}); "
                f"the index is corrupt: {REBUILD_HINT}"
            )
        running = 0  # bytes before the current chunk
        for begin in range(0, seq_count, _CHECK_CHUNK):
            chunk = lengths[begin : begin + _CHECK_CHUNK].astype(np.int64)
            if chunk.min() < 0:
                bad = begin + int(np.argmax(chunk < 0))
                raise IndexedDatasetError(
                    f"{idx_path}: sequence {bad} has negative length {int(lengths[bad])}; the index is corrupt: {REBUILD_HINT}"
                )
            ends = np.cumsum(chunk * itemsize) + running
            starts = ends - chunk * itemsize
            wrong = pointers[begin : begin + _CHECK_CHUNK] != starts
            if wrong.any():
                bad = int(np.argmax(wrong))
                raise IndexedDatasetError(
                    f"{idx_path}: sequence {begin + bad} starts at byte {int(pointers[begin + bad])} of the .bin but "
                    f"the lengths before it put it at byte {int(starts[bad])} (pointers and lengths disagree); the "
                    f"index is corrupt: {REBUILD_HINT}"
                )
            running = int(ends[-1])
        if bin_size != running:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes, but the index describes {running} bytes; "
                f"the .bin is truncated or belongs to another index: {REBUILD_HINT}"
            )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (a view into the mapped .bin)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {idx} of length {seq_len}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def close(self) -> None:
        """Drop the mappings (numpy views keep a mapping alive until they are freed too)."""
        self._bin_map = self._idx_map = None  # type: ignore[assignment]
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None  # type: ignore[assignment]

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))
