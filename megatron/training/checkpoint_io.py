"""Storage helpers of the `torch_dist` training checkpoint (see `checkpointing.py` for the format).

- `SafeFileSystemReader`: torch.distributed.checkpoint's FileSystemReader whose `.metadata` is
  read with an allow-listing unpickler (DCP itself uses plain `pickle.load`), so a tampered
  checkpoint cannot execute code; the `.distcp` payload is raw tensor bytes.
- `placements_for` / `to_storage`: how one rank's local tensor sits inside the FULL logical tensor
  stored under the parameter's name, as a DTensor over a rank mesh (no communication), read from
  the same attributes `sharding.shard_of` uses.
- RNG states as JSON, atomic small-file writes, checkpoint verification.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "master")
COMMON_NAME = "common.json"
RNG_DIR = "rng"
METADATA_NAME = ".metadata"
FORMAT = "megatron-deepseek-torch_dist/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


# ---- safe metadata reading --------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch._utils", "_get_layout"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (a function, os.system, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


def read_metadata(directory: str) -> Metadata:
    """The DCP metadata of a checkpoint directory, read safely; CheckpointError names the file."""
    path = os.path.join(directory, METADATA_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (incomplete checkpoint: the save did not finish)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as exc:  # corrupt / truncated / forbidden content
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {exc}") from exc
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (got {type(md).__name__})")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader with the allow-listing metadata unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata files are not used by this format")
        md = read_metadata(str(self.path))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def check_storage_files(directory: str, md: Metadata) -> None:
    """Every data file the metadata names exists and is long enough (catches truncated writes)."""
    need: Dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: data file missing (incomplete checkpoint)")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} bytes, metadata needs {size})")


def check_tiling(md: Metadata) -> None:
    """Every stored tensor's chunks cover its full shape exactly (no shard missing)."""
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        numel = 1
        for d in item.size:
            numel *= int(d)
        covered = 0
        for chunk in item.chunks:
            n = 1
            for d in chunk.sizes:
                n *= int(d)
            covered += n
        if covered != numel:
            raise CheckpointError(f"tensor {key!r}: stored chunks cover {covered} of {numel} elements (incomplete)")


# ---- layout-independent storage of a rank's tensor ---------------------------------------------
def stored_view_shape(name: str, full_shape: Tuple[int, ...], is_expert: bool) -> Tuple[int, ...]:
    """Shape under which a full tensor is stored: the fused dense SwiGLU [2F, H] as [2, F, H]
    (same memory order), so a TP shard [gate chunk; up chunk] is a plain chunk along dim 1."""
    if not is_expert and name.endswith("gate_up_proj.weight") and len(full_shape) == 2:
        return (2, full_shape[0] // 2, full_shape[1])
    return tuple(full_shape)


def placements_for(name: str, param: torch.Tensor, state: Any) -> Tuple[str, List[Tuple[str, int]]]:
    """(mesh kind "dense"/"expert", [(mesh dim name, stored tensor dim it splits)]) for a local tensor.

    Mirrors `sharding.shard_of`: experts split dim 0 over EP; `tensor_model_parallel` parameters
    split `partition_dim` over TP (dim 1 of the [2, F, H] view for the fused gate_up)."""
    expert = bool(getattr(param, "is_expert", False))
    splits: List[Tuple[str, int]] = []
    tp = state.size("tp") if state is not None else 1
    ep = state.size("ep") if state is not None else 1
    if expert and ep > 1:
        splits.append(("ep", 0))
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim = int(getattr(param, "partition_dim", 0))
        if not expert and name.endswith("gate_up_proj.weight"):
            if dim != 0:
                raise ValueError(f"{name}: fused gate_up split along dim {dim}, expected 0")
            dim = 1
        if expert:
            if state.size("etp") != tp:
                raise NotImplementedError(f"{name}: TP-split expert with expert-tensor-parallel size != TP size")
            splits.append(("etp", dim))
        else:
            splits.append(("tp", dim))
    return ("expert" if expert else "dense"), splits


def _mesh(state: Any, kind: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    cache = state.__dict__.setdefault("_checkpoint_meshes", {})
    if kind not in cache:
        g = state.grid
        if kind == "dense":
            shape, names = (g.pp, g.dp, g.tp), ("pp", "dp", "tp")
        else:
            shape, names = (g.pp, g.edp, g.ep, g.etp), ("pp", "edp", "ep", "etp")
        ranks = torch.arange(g.world_size).reshape(shape)
        # No process groups needed: DCP only reads each rank's coordinate to place its chunk.
        cache[kind] = DeviceMesh("cpu", ranks, mesh_dim_names=names, _init_backend=False)
    return cache[kind]


def to_storage(name: str, param: torch.Tensor, local: torch.Tensor, state: Any, distributed: bool) -> torch.Tensor:
    """`local` (this rank's part of `name`, shaped like `param`) as the object DCP stores: a DTensor
    over the rank mesh when the tensor is split, else a plain tensor (DCP keeps one copy of
    identical keys written by several ranks)."""
    kind, splits = placements_for(name, param, state)
    expert = kind == "expert"
    if not expert and name.endswith("gate_up_proj.weight") and local.dim() == 2:
        local = local.reshape(2, local.shape[0] // 2, local.shape[1])
    if not splits or not distributed:
        return local
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = _mesh(state, kind)
    by_dim = dict(splits)
    placements = [Shard(by_dim[n]) if n in by_dim else Replicate() for n in mesh.mesh_dim_names]
    return DTensor.from_local(local, mesh, placements, run_check=False)


def storage_local(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a loaded storage object, shaped like the parameter `like`."""
    from torch.distributed.tensor import DTensor

    t = stored.to_local() if isinstance(stored, DTensor) else stored
    return t.reshape(like.shape)


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


def read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt JSON: {exc}") from exc


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


def expected_optim_keys(md: Metadata) -> List[str]:
    """Optimizer keys that must accompany the stored model keys (verification)."""
    keys = md.state_dict_metadata
    names = {k[len(OPTIM_PREFIX):].rsplit("/", 1)[0] for k in keys if k.startswith(OPTIM_PREFIX)}
    missing = []
    for n in sorted(names):
        if MODEL_PREFIX + n not in keys:
            missing.append(MODEL_PREFIX + n)
        for sub in ("exp_avg", "exp_avg_sq"):
            if f"{OPTIM_PREFIX}{n}/{sub}" not in keys:
                missing.append(f"{OPTIM_PREFIX}{n}/{sub}")
    return missing


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
