"""On-disk format of distributed training checkpoints: per-rank data files and a JSON index.

One iteration directory holds

    rank_{r:05d}.bin   the raw little-endian bytes of the boxes rank r wrote, back to back
    index.json         {"sha256": <hex of the canonical JSON of "index">, "index": {
                          "format", "iteration", "block_bytes",
                          "files": [{"name", "bytes", "blocks": [sha256 hex per block_bytes block],
                                     "sha256": <hex of the concatenated block digests>}],
                          "aux_files": {relative path: sha256 hex} (common.json, rng/*.json),
                          "tensors": {key: {"dtype", "shape": [global logical shape],
                                            "trainable": bool or null,
                                            "boxes": [[file, byte offset, [offsets], [sizes]], ...]}}}}

Why not torch.distributed.checkpoint: its `.metadata` is a pickle, and anything that unpickles it
(even behind an allow-list) lets a crafted file choose how objects are rebuilt; it also re-reads
byte payloads with `torch.load(weights_only=False)`. Here every byte of metadata is JSON, parsed
with a strict schema (duplicate keys, NaN, floats and unknown fields refused, every number range
checked against the shapes and file sizes), and tensor data is only ever copied as raw bytes
into tensors of a dtype taken from a fixed allow-list: loading cannot execute code. The format
is also simpler to reason about for memory: a rank writes straight from its live tensors
(no copy on the host, a bounded staging buffer for device tensors) and reads through one
bounded buffer, intersecting the boxes it needs with the stored boxes.

Integrity: each data file is hashed in blocks of `block_bytes` while it is written; a reader
verifies every block it touches before using its bytes (a flipped byte fails the load naming the
file and iteration), `verify` re-hashes everything. The index carries its own checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron.training.checkpoint_boxes import contains, intersect, numel
from megatron.training.checkpoint_io import COMMON_NAME, CheckpointError, parse_json_object, parse_strict_json, read_text

FORMAT = "megatron-deepseek-torch_dist/2"
OLD_FORMATS = ("megatron-deepseek-torch_dist/1",)
INDEX_NAME = "index.json"
DEFAULT_BLOCK_BYTES = 8 << 20
DEFAULT_BUFFER_BYTES = 64 << 20
MIN_BUFFER_BYTES = 16  # at least one element of any dtype

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise TypeError(f"dtype {dtype} cannot be stored in a checkpoint (allowed: {sorted(DTYPES)})")
    return _NAMES[dtype]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def data_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.bin"


def _little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("checkpoint data is little-endian; this machine is big-endian (unsupported)")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# ---- writing -------------------------------------------------------------------------------------
class DataFileWriter:
    """Appends tensor bytes to one data file, hashing them in blocks as they go (no re-read)."""

    def __init__(self, path: str, block_bytes: int = DEFAULT_BLOCK_BYTES, staging_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        _little_endian()
        self.path, self.block_bytes = path, int(block_bytes)
        self.staging_bytes = max(MIN_BUFFER_BYTES, int(staging_bytes))
        self._file = open(path, "wb")
        self._block = hashlib.sha256()
        self._fill = 0
        self.blocks: List[str] = []
        self.bytes = 0
        self._staging: Optional[torch.Tensor] = None  # CPU bounce buffer for device tensors, made on demand

    def _feed(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self.block_bytes - self._fill)
            part = view[:take]
            self._file.write(part)
            self._block.update(part)
            self._fill += take
            self.bytes += take
            if self._fill == self.block_bytes:
                self.blocks.append(self._block.hexdigest())
                self._block, self._fill = hashlib.sha256(), 0
            view = view[take:]

    def write(self, flat: torch.Tensor, start: int, count: int) -> int:
        """Append elements [start, start + count) of the 1-D contiguous `flat`; returns their byte offset."""
        offset = self.bytes
        piece = flat.detach()[start : start + count]
        if piece.device.type == "cpu":
            # A view of the tensor's own memory: nothing is copied on the host.
            self._feed(memoryview(piece.contiguous().view(torch.uint8).numpy()).cast("B"))
        else:
            self.write_staged(piece)
        return offset

    def write_staged(self, piece: torch.Tensor) -> None:
        """Append a 1-D tensor through the host staging buffer, at most `staging_bytes` at a time
        (device tensors: one bounded copy to the host per chunk)."""
        size, count = piece.element_size(), piece.numel()
        step = max(1, self.staging_bytes // size)
        for i in range(0, count, step):
            chunk = piece[i : i + step]
            nbytes = chunk.numel() * size
            if self._staging is None or nbytes > self._staging.numel():
                self._staging = torch.empty(nbytes, dtype=torch.uint8)
            stage = self._staging[:nbytes]
            stage.view(piece.dtype).copy_(chunk)
            self._feed(memoryview(stage.numpy()).cast("B"))

    def close(self) -> Dict[str, Any]:
        """Flush, fsync and close; the file's index entry (name, bytes, block digests, checksum)."""
        if self._fill:
            self.blocks.append(self._block.hexdigest())
            self._fill = 0
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"name": os.path.basename(self.path), "bytes": self.bytes, "blocks": list(self.blocks),
                "sha256": sha256_text("".join(self.blocks))}


def write_index(directory: str, body: Dict[str, Any], write_text: Any) -> str:
    """Write index.json (self-checksummed) through `write_text(path, text)`; returns the path."""
    text = json.dumps({"sha256": sha256_text(_canonical(body)), "index": body}, separators=(",", ":"), allow_nan=False)
    path = os.path.join(directory, INDEX_NAME)
    write_text(path, text)
    return path


# ---- strict reading of the index -------------------------------------------------------------------
def _int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return value


def _ints(value: Any, what: str, length: Optional[int] = None) -> Tuple[int, ...]:
    if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) > 8:
        raise ValueError(f"{what}: expected a list of {length if length is not None else 'at most 8'} integers, got {value!r}")
    return tuple(_int(v, what) for v in value)


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{what}: expected a sha256 hex digest")
    return value


def _keys(obj: Any, what: str, required: Sequence[str], optional: Sequence[str] = ()) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected an object")
    missing = [k for k in required if k not in obj]
    unknown = [k for k in obj if k not in required and k not in optional]
    if missing or unknown:
        raise ValueError(f"{what}: missing {missing} / unknown {unknown} fields")
    return obj


@dataclass(frozen=True)
class StoredBox:
    file: int
    byte_offset: int
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    trainable: Optional[bool]
    boxes: Tuple[StoredBox, ...]


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    blocks: Tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class Index:
    """A validated index.json."""

    directory: str
    iteration: int
    block_bytes: int
    files: Tuple[FileEntry, ...]
    aux_files: Dict[str, str]
    tensors: Dict[str, TensorEntry]

    def where(self) -> str:
        return f"(iteration {self.iteration})"


def old_format_marker(directory: str) -> Optional[str]:
    """The file showing that `directory` holds the earlier DCP-based format, if any."""
    if os.path.exists(os.path.join(directory, ".metadata")):
        return os.path.join(directory, ".metadata")
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    hits = sorted(n for n in names if n.endswith(".distcp"))
    return os.path.join(directory, hits[0]) if hits else None


def old_format_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: checkpoint in the earlier torch.distributed.checkpoint format ({OLD_FORMATS[0]}), which is no longer "
        f"read (its pickled .metadata is never opened); re-save it with the version that wrote it into {FORMAT}"
    )


def read_index(directory: str) -> Index:
    """Parse and validate `directory`/index.json; CheckpointError naming the file otherwise."""
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        marker = old_format_marker(directory)
        if marker is not None:
            raise old_format_error(marker)
        raise CheckpointError(f"{path}: missing (incomplete checkpoint: the save did not finish)")
    try:
        with open(path, encoding="utf-8") as f:
            outer = parse_strict_json(f.read(), floats=False)
        _keys(outer, "index.json", ("sha256", "index"))
        if sha256_text(_canonical(outer["index"])) != _hex(outer["sha256"], "sha256"):
            raise ValueError("checksum mismatch: the index is corrupt")
        return _validate(directory, outer["index"])
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a checkpoint index: {exc}") from None


def _validate(directory: str, body: Any) -> Index:
    _keys(body, "index", ("format", "iteration", "block_bytes", "files", "aux_files", "tensors"))
    if body["format"] != FORMAT:
        raise ValueError(f"unknown format {body['format']!r} (this version reads {FORMAT})")
    iteration = _int(body["iteration"], "iteration")
    block = _int(body["block_bytes"], "block_bytes", 1)
    if not isinstance(body["files"], list):
        raise ValueError("files: expected a list")
    files = []
    for i, f in enumerate(body["files"]):
        _keys(f, f"files[{i}]", ("name", "bytes", "blocks", "sha256"))
        name = f["name"]
        if not isinstance(name, str) or not name.endswith(".bin") or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"files[{i}]: bad file name {name!r}")
        size = _int(f["bytes"], f"files[{i}].bytes")
        if not isinstance(f["blocks"], list) or len(f["blocks"]) != -(-size // block):
            raise ValueError(f"files[{i}]: expected {-(-size // block)} block digests")
        blocks = tuple(_hex(b, f"files[{i}].blocks") for b in f["blocks"])
        files.append(FileEntry(name, size, blocks, _hex(f["sha256"], f"files[{i}].sha256")))
    aux = body["aux_files"]
    if not isinstance(aux, dict):
        raise ValueError("aux_files: expected an object")
    for rel, digest in aux.items():
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or len(parts) > 2:
            raise ValueError(f"aux_files: bad path {rel!r}")
        _hex(digest, f"aux_files[{rel!r}]")
    if not isinstance(body["tensors"], dict):
        raise ValueError("tensors: expected an object")
    tensors = {}
    for key, t in body["tensors"].items():
        _keys(t, f"tensor {key!r}", ("dtype", "shape", "trainable", "boxes"))
        if t["dtype"] not in DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {t['dtype']!r} not allowed")
        dtype = DTYPES[t["dtype"]]
        shape = _ints(t["shape"], f"tensor {key!r} shape")
        if t["trainable"] not in (True, False, None):
            raise ValueError(f"tensor {key!r}: trainable must be true, false or null")
        if not isinstance(t["boxes"], list):
            raise ValueError(f"tensor {key!r}: boxes must be a list")
        boxes = []
        for b in t["boxes"]:
            if not isinstance(b, list) or len(b) != 4:
                raise ValueError(f"tensor {key!r}: a box must be [file, byte offset, offsets, sizes]")
            fi, off = _int(b[0], f"tensor {key!r} box file"), _int(b[1], f"tensor {key!r} box byte offset")
            offsets, sizes = _ints(b[2], f"tensor {key!r} box offsets", len(shape)), _ints(b[3], f"tensor {key!r} box sizes", len(shape))
            if fi >= len(files):
                raise ValueError(f"tensor {key!r}: box names file {fi} of {len(files)}")
            if not contains(shape, offsets, sizes):
                raise ValueError(f"tensor {key!r}: box {offsets}+{sizes} outside the shape {shape}")
            if off + numel(sizes) * itemsize(dtype) > files[fi].bytes:
                raise ValueError(f"tensor {key!r}: box extends past the end of {files[fi].name}")
            boxes.append(StoredBox(fi, off, offsets, sizes))
        tensors[key] = TensorEntry(dtype, shape, t["trainable"], tuple(boxes))
    return Index(directory, iteration, block, tuple(files), dict(aux), tensors)


def read_common(path: str, index: Optional[Index] = None) -> Dict[str, Any]:
    """common.json of an iteration dir, format-checked (and checksum-checked against `index`)."""
    where = os.path.join(path, COMMON_NAME)
    text = read_text(where)
    common = parse_json_object(text, where, constants=True)
    if common.get("format") in OLD_FORMATS:
        raise old_format_error(where)
    if common.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown format {common.get('format')!r} (this version reads {FORMAT})")
    if index is not None and index.aux_files.get(COMMON_NAME) != sha256_text(text):
        raise CheckpointError(f"{where}: checksum mismatch {index.where()}: the file is corrupt")
    if type(common.get("iteration")) is not int:
        raise CheckpointError(f"{where}: no iteration number")
    return common


# ---- reading tensor data ----------------------------------------------------------------------------
def _strides(sizes: Sequence[int]) -> Tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= int(s)
    return tuple(reversed(out))


class CheckpointReader:
    """Reads requested boxes of stored tensors through one bounded buffer, verifying every block
    of data it touches against the index (once per block)."""

    def __init__(self, index: Index, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        _little_endian()
        self.index = index
        self.limit = max(MIN_BUFFER_BYTES, int(buffer_bytes))
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._fds: Dict[int, int] = {}
        self._verified: Dict[int, set] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _path(self, file: int) -> str:
        return os.path.join(self.index.directory, self.index.files[file].name)

    def _fd(self, file: int) -> int:
        if file not in self._fds:
            if len(self._fds) >= 64:  # bound open descriptors on jobs with many ranks
                os.close(self._fds.pop(next(iter(self._fds))))
            path, want = self._path(file), self.index.files[file].bytes
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open data file {self.index.where()}: {exc.strerror}") from None
            have = os.fstat(fd).st_size
            if have != want:
                os.close(fd)
                raise CheckpointError(f"{path}: {have} bytes, the index records {want} {self.index.where()}: truncated or damaged")
            self._fds[file] = fd
        return self._fds[file]

    def _pread(self, fd: int, view: memoryview, offset: int, path: str) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done} {self.index.where()}")
            done += n

    def _read(self, file: int, start: int, length: int) -> torch.Tensor:
        """Bytes [start, start + length) of a data file in the shared buffer, every block verified."""
        if self._buffer.numel() < length:
            self._buffer = torch.empty(max(length, min(self.limit, 2 * self._buffer.numel())), dtype=torch.uint8)
        out = self._buffer[:length]
        view = memoryview(out.numpy()).cast("B")
        fd, path = self._fd(file), self._path(file)
        self._pread(fd, view, start, path)
        entry, block = self.index.files[file], self.index.block_bytes
        done = self._verified.setdefault(file, set())
        for k in range(start // block, (start + length - 1) // block + 1):
            if k in done:
                continue
            lo, hi = k * block, min((k + 1) * block, entry.bytes)
            if lo >= start and hi <= start + length:
                digest = hashlib.sha256(view[lo - start : hi - start]).hexdigest()
            else:  # block only partly inside the span: hash it whole, once
                whole = bytearray(hi - lo)
                self._pread(fd, memoryview(whole), lo, path)
                digest = hashlib.sha256(whole).hexdigest()
                del whole
            if digest != entry.blocks[k]:
                raise CheckpointError(
                    f"{path}: checksum mismatch in bytes [{lo}, {hi}) {self.index.where()}: the data file is corrupt"
                )
            done.add(k)
        return out

    def _copy(self, box: StoredBox, dtype: torch.dtype, off: Tuple[int, ...], size: Tuple[int, ...], out: torch.Tensor) -> None:
        """Copy the sub-box (off, size) (global offsets, inside `box`) into `out` (shape `size`)."""
        isz = itemsize(dtype)
        strides = _strides(box.sizes)
        rel = [o - b for o, b in zip(off, box.offsets)]
        first = sum(r * s for r, s in zip(rel, strides))
        last = sum((r + n - 1) * s for r, n, s in zip(rel, size, strides))
        span = last - first + 1
        if span * isz <= self.limit or numel(size) == 1:
            raw = self._read(box.file, box.byte_offset + first * isz, span * isz)
            src = raw.view(dtype).as_strided(size, strides) if size else raw.view(dtype).reshape(())
            out.copy_(src)
            return
        d = next(i for i, n in enumerate(size) if n > 1)  # split the outermost dimension that can be split
        half = size[d] // 2
        for lo, n in ((0, half), (half, size[d] - half)):
            sub_off = tuple(o + lo if i == d else o for i, o in enumerate(off))
            sub_size = tuple(n if i == d else s for i, s in enumerate(size))
            self._copy(box, dtype, sub_off, sub_size, out.narrow(d, lo, n))

    def read_into(self, key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...], out: torch.Tensor) -> int:
        """Fill `out` (shape `sizes`, any dtype / device) with the box (offsets, sizes) of stored
        tensor `key`, casting from the stored dtype; returns the number of elements found."""
        entry = self.index.tensors[key]
        found = 0
        for box in entry.boxes:
            common = intersect(offsets, sizes, box.offsets, box.sizes)
            if common is None:
                continue
            c_off, c_size = common
            dest = out
            for d, (o, n) in enumerate(zip(c_off, c_size)):
                dest = dest.narrow(d, o - offsets[d], n)
            self._copy(box, entry.dtype, c_off, c_size, dest)
            found += numel(c_size)
        return found

    def verify_file(self, file: int) -> None:
        """Re-hash a whole data file (block digests and the file checksum)."""
        entry, path = self.index.files[file], self._path(file)
        fd, block = self._fd(file), self.index.block_bytes
        chunk = bytearray(min(block, max(entry.bytes, 1)))
        digests = []
        for k, lo in enumerate(range(0, entry.bytes, block)):
            n = min(block, entry.bytes - lo)
            view = memoryview(chunk)[:n]
            self._pread(fd, view, lo, path)
            digests.append(hashlib.sha256(view).hexdigest())
            if digests[-1] != entry.blocks[k]:
                raise CheckpointError(f"{path}: checksum mismatch in bytes [{lo}, {lo + n}) {self.index.where()}: the data file is corrupt")
        if sha256_text("".join(digests)) != entry.sha256:
            raise CheckpointError(f"{path}: file checksum mismatch {self.index.where()}")
        self._verified[file] = set(range(len(digests)))
