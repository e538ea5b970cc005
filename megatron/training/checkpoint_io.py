"""Small pieces shared by the training-checkpoint modules: errors, names, locating a checkpoint
(tracker, iteration directories), atomic small-file writes and strict JSON reads, RNG state as
JSON, the tensors of a module that are saved, and reading the single-process hf_io format.

Module map: `checkpoint_format` (data files + JSON index), `checkpoint_boxes` (box geometry),
`checkpointing` (save / load protocol), `checkpoint_lock` (one writer per save directory),
`checkpoint_verify` (verification, `tools/verify_checkpoint.py`), `checkpoint_export` (full
tensors / one-process model / writing a checkpoint from one model).
"""

from __future__ import annotations

import base64
import json
import os
import random
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "master")
COMMON_NAME = "common.json"
RNG_DIR = "rng"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
OLD_MARK = ".tmp-old-"  # iter_N.tmp-old-XXXX: a complete iter_N moved aside while iter_N is re-saved
TMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe (the message names the file)."""


# ---- metadata collectives ---------------------------------------------------------------------------
# Checkpoints exchange only small picklable metadata between the ranks of one job (plans, index
# entries, errors): object all-gathers of `megatron.core.communication`, which place their
# buffers on the rank's device as each backend needs. Tensor data never travels between ranks.
def rank() -> int:
    from megatron.core import communication as comm

    return comm.rank()


def world() -> int:
    from megatron.core import communication as comm

    return comm.world_size()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (collective over all ranks; [obj] without a process group)."""
    from megatron.core import communication as comm

    return comm.all_gather_object(obj)


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (collective; what other ranks pass is ignored)."""
    return all_gather_object(obj if rank() == 0 else None)[0]


# ---- locating a checkpoint ---------------------------------------------------------------------
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """Iteration named by the tracker file, None when there is none; CheckpointError when corrupt."""
    path = os.path.join(root, TRACKER_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        value = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None
    if value < 0:
        raise CheckpointError(f"{path}: negative iteration {value}")
    return value


def is_iteration_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMMON_NAME))


def moved_aside(root: str, iteration: int) -> Optional[str]:
    """A complete iter_N moved aside by a re-save of iteration N that was killed before the new
    iter_N was in place (the next save moves it back), or None."""
    base = os.path.basename(iteration_dir(root, iteration)) + OLD_MARK
    try:
        hits = sorted(e for e in os.listdir(root) if e.startswith(base))
    except OSError:
        return None
    return os.path.join(root, hits[0]) if hits else None


def resolve(load_dir: str) -> Optional[str]:
    """The iteration directory to load from `load_dir` (a save root or an iter_N dir), or None."""
    if is_iteration_dir(load_dir):
        return load_dir
    iteration = read_tracker(load_dir)
    if iteration is None:
        return None
    path = iteration_dir(load_dir, iteration)
    if os.path.isdir(path):
        return path
    aside = moved_aside(load_dir, iteration)
    if aside is not None:
        return aside
    raise CheckpointError(f"{os.path.join(load_dir, TRACKER_NAME)} names iteration {iteration} but {path} does not exist")


def is_hf_io_dir(path: str) -> bool:
    """The single-process format of `hf_io` (config.json + safetensors, no tracker)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path))


def complete_iterations(root: str) -> List[Tuple[int, str]]:
    """(iteration, dir) of the finished iteration directories under a save root, newest first."""
    out = []
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        if not name.startswith("iter_") or TMP_MARK in name:
            continue
        digits = name[len("iter_"):]
        path = os.path.join(root, name)
        if digits.isdigit() and is_iteration_dir(path):
            out.append((int(digits), path))
    return sorted(out, reverse=True)


# ---- strict JSON -------------------------------------------------------------------------------------
def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _refuse(value: str) -> Any:
    raise ValueError(f"{value} is not allowed")


def parse_strict_json(text: str, floats: bool = True, constants: bool = False) -> Any:
    """JSON without duplicate keys, without floats unless `floats`, and without NaN / Infinity
    unless `constants` (run arguments and scheduler state may hold an infinite float)."""
    return json.loads(
        text, object_pairs_hook=_no_duplicates, parse_constant=float if constants else _refuse,
        parse_float=float if floats else _refuse,
    )


# ---- RNG ----------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state_json(device: Any) -> Dict[str, Any]:
    """Python, numpy, torch CPU and device RNG states as JSON-able primitives."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    dev = device.get_rng_state() if device is not None else None
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "torch_cpu": _b64(torch.get_rng_state()),
        "device": None if dev is None else _b64(dev),
        "device_kind": getattr(device, "kind", None),
    }


def restore_rng_state(state: Dict[str, Any], device: Any) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_from_b64(state["torch_cpu"]))
    if state.get("device") is not None and device is not None and state.get("device_kind") == getattr(device, "kind", None):
        device.set_rng_state(_from_b64(state["device"]))


# ---- small files ---------------------------------------------------------------------------------
def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same directory, fsync, os.replace)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None


def parse_json_object(text: str, path: str, constants: bool = False) -> Dict[str, Any]:
    try:
        value = parse_strict_json(text, constants=constants)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_json(path: str) -> Dict[str, Any]:
    """A JSON object file, strictly parsed; CheckpointError naming the file otherwise."""
    return parse_json_object(read_text(path), path)


def persistent_named_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module, by name (first occurrence of shared ones)."""
    out: Dict[str, torch.Tensor] = {}
    keys = set(module.state_dict().keys())
    for name, p in module.named_parameters():
        out.setdefault(name, p)
    for name, b in module.named_buffers():
        if name in keys:
            out.setdefault(name, b)
    return out


# ---- hf_io single-process format -----------------------------------------------------------------
class _LazyFull(dict):
    """Mapping view of an hf_io safetensors directory (tensors read on access)."""

    def __init__(self, reader: Any, tied: bool) -> None:
        super().__init__()
        self.reader, self.tied = reader, tied

    def _key(self, name: str) -> str:
        if name not in self.reader and self.tied and name == "output_layer.weight":
            return "embedding.weight"
        return name

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self.reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.get(self._key(name))


def load_hf_io(directory: str, chunks: List[nn.Module], state: Any) -> None:
    """Weights of the single-process hf_io format into this rank's shards (shard_of)."""
    from megatron.core.models.deepseek.hf_io import SafetensorsReader
    from megatron.core.models.deepseek.sharding import ShardInfo, load_full_state_dict

    info = ShardInfo.from_parallel_state(state) if state is not None else ShardInfo()
    with SafetensorsReader(directory) as reader:
        for module in chunks:
            tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
            try:
                load_full_state_dict(module, _LazyFull(reader, tied), info)
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{directory}: {exc}") from exc


def optional_device() -> Optional[Any]:
    """The device layer for this process (None if it cannot be built)."""
    try:
        from megatron.core.device import get_device

        return get_device("auto")
    except Exception:  # pragma: no cover - device detection must never break checkpointing
        return None
