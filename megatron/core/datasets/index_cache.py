"""On-disk cache of dataset indices (`--data-cache-path`), safe with many ranks starting at once.

Files are `<dir>/<key>-<name>.npy`, where `key` hashes everything that determines the arrays,
so a change of data, split, seed, sequence length or sample count never reuses a stale index.

* Writing: each array goes to a temporary file in the same directory (unique per process and
  call), then is `os.replace`d onto its final name. The rename is atomic, so a reader sees either
  no file or a complete one, and concurrent writers of the same key (every rank building at once)
  simply replace identical content. No fsync: a cache file that a power cut left empty or torn
  fails to load or check and is rebuilt, and an fsync per file (~10 ms here) would make a blend
  of a thousand datasets spend most of its start-up waiting on the disk.
* Reading: arrays are memory-mapped (shared by dataloader workers through the page cache) and
  checked by the caller against their expected shapes, dtypes and value ranges; anything that
  fails to load or check is rebuilt and rewritten instead of crashing the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def cache_key(description: Mapping[str, Any]) -> str:
    """Stable hex digest of a JSON-able description (sorted keys, so dict order is irrelevant)."""
    text = json.dumps({"cache_format": CACHE_FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_fingerprint(path: str) -> dict[str, Any]:
    """What identifies a data file cheaply: its absolute path and size in bytes."""
    return {"path": os.path.abspath(path), "size": os.path.getsize(path)}


def cache_path(directory: str, key: str, name: str, suffix: str = ".npy") -> str:
    return os.path.join(directory, f"{key}-{name}{suffix}")


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file atomically (same protocol as the arrays)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _atomic_write(path, lambda f: f.write(text), "w")


def index_cache_directory(prefix: str, path_to_cache: Optional[str]) -> Optional[str]:
    """Where the indices of the dataset at `prefix` are cached: `--data-cache-path` when given
    (ValueError if it cannot be written), else `<data dir>/cache/GPTDataset_indices` when that is
    writable, else None (built in memory, not cached)."""
    if path_to_cache is not None:
        if not writable_directory(path_to_cache):
            raise ValueError(f"--data-cache-path {path_to_cache!r} cannot be created or written")
        return path_to_cache
    directory = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")
    if not writable_directory(directory):
        logger.warning("%s is not writable: GPT indices are built in memory and not cached", directory)
        return None
    return directory


def save_arrays(directory: str, key: str, arrays: Mapping[str, np.ndarray], description: Mapping[str, Any]) -> None:
    """Write each array atomically as `<key>-<name>.npy`, then a human-readable description."""
    os.makedirs(directory, exist_ok=True)
    for name, array in arrays.items():
        _atomic_write(cache_path(directory, key, name), lambda f, a=array: np.save(f, a, allow_pickle=False), "wb")
    text = json.dumps(description, sort_keys=True, indent=2, default=str)
    _atomic_write(cache_path(directory, key, "description", ".json"), lambda f: f.write(text), "w")


_NPY_HEADER = re.compile(r"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")


def load_npy_mmap(path: str) -> np.ndarray:
    """`np.load(path, mmap_mode="r")` for the `.npy` files `np.save` writes, with the header
    parsed by a regular expression instead of `ast.literal_eval` (a third of the time of opening
    a cached index, which a blend of thousands of datasets does thousands of times)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2):
            return np.load(path, mmap_mode="r", allow_pickle=False)  # let numpy say what is wrong
        size_bytes = 2 if head[6] == 1 else 4
        header_len = struct.unpack("<H" if size_bytes == 2 else "<I", head[8 : 8 + size_bytes])[0]
        f.seek(8 + size_bytes)
        header = f.read(header_len).decode("latin1").strip()
    match = _NPY_HEADER.fullmatch(header)
    if match is None:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    shape = tuple(int(x) for x in match.group(2).split(",") if x.strip())
    if 0 in shape:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # an empty file cannot be mapped
    return np.memmap(path, dtype=np.dtype(match.group(1)), mode="r", offset=8 + size_bytes + header_len, shape=shape)


def load_arrays(
    directory: str,
    key: str,
    names: tuple[str, ...],
    check: Callable[[dict[str, np.ndarray]], Optional[str]],
) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays memory-mapped read-only, or None if any is missing, unreadable or fails
    `check` (which returns None when the arrays are valid, else the reason, which is logged)."""
    paths = {name: cache_path(directory, key, name) for name in names}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        arrays = {name: load_npy_mmap(p) for name, p in paths.items()}
        problem = check(arrays)
    except (OSError, ValueError, EOFError) as exc:
        problem = f"unreadable ({exc})"
    if problem is not None:
        logger.warning("rebuilding the cached index %s in %s: %s", key, directory, problem)
        return None
    return arrays


def writable_directory(directory: str) -> bool:
    """Create `directory` if needed and tell whether files can be created in it."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class MappedFile:
    """Stands for a memory-mapped cache file inside a pickled dataset."""

    path: str


def memmaps_to_names(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dataset's `__dict__` with memory-mapped arrays replaced by their file names, so
    pickling a dataset for a spawned DataLoader worker sends names, not gigabytes."""
    return {
        key: MappedFile(value.filename) if isinstance(value, np.memmap) and value.filename else value
        for key, value in state.items()
    }


def names_to_memmaps(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `memmaps_to_names`: re-map the named files read-only."""
    return {
        key: load_npy_mmap(value.path) if isinstance(value, MappedFile) else value
        for key, value in state.items()
    }
