"""Safetensors streaming, empty-model construction and our own checkpoint format.

Our checkpoint format (used until the distributed training checkpoint exists) is a directory:

    config.json                    our DeepSeekConfig as JSON (`dataclasses.asdict`, nested
                                   sections mla / moe / rope / mtp / kernels as objects)
    model.safetensors              every persistent tensor of `DeepSeekModel.state_dict()` under
                                   OUR names (see model.py), or, when larger than the shard size,
    model-0000k-of-0000N.safetensors + model.safetensors.index.json
                                   ({"metadata": {"total_size": bytes}, "weight_map": {name: file}},
                                   the same index layout as HF checkpoints).

A tied output head (`tie_word_embeddings`) is stored once, as `embedding.weight`. The expert
bias (`router.expert_bias`) is stored in fp32 whatever the parameter dtype.

Memory: readers open shards with `safetensors.safe_open` (memory-mapped) and hand out one tensor
at a time; writers hold at most one shard (`max_shard_bytes`) of tensors before writing it, so
converting a model needs about the model plus one shard.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megatron.core.config import DeepSeekConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3  # bytes per shard file unless the caller says otherwise

NamedTensors = Iterable[Tuple[str, torch.Tensor]]


# ---- config.json of our format --------------------------------------------------------------------
def config_to_json_dict(config: DeepSeekConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json_dict(d: Mapping[str, Any]) -> DeepSeekConfig:
    """Inverse of `config_to_json_dict`; unknown keys are an error (a file from another tool?)."""
    kwargs: Dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(DeepSeekConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"config.json has keys that DeepSeekConfig does not know: {unknown} (an HF config? use config_from_hf)")
    for name, value in d.items():
        f = fields[name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            section_cls = type(f.default_factory())
            section_fields = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = sorted(set(value) - section_fields)
            if bad:
                raise ValueError(f"config.json section {name!r} has unknown keys {bad}")
            value = section_cls(**value)
        kwargs[name] = value
    return DeepSeekConfig(**kwargs)


def read_our_config(directory: str) -> DeepSeekConfig:
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        return config_from_json_dict(json.load(f))


# ---- reading -------------------------------------------------------------------------------------
class SafetensorsReader:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, one at a time.

    Finds `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors` file.
    Shards are memory-mapped lazily and kept open (cheap: nothing is read until a tensor is asked for).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        index_path = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map: Dict[str, str] = json.load(f)["weight_map"]
            self.files = sorted(set(weight_map.values()))
        else:
            single = os.path.join(path, SINGLE_NAME)
            found = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not found:
                raise FileNotFoundError(f"no safetensors checkpoint in {path!r} (no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors)")
            self.files = [os.path.basename(p) for p in found]
            weight_map = {}
            for name in self.files:
                with safe_open(os.path.join(path, name), framework="pt") as handle:
                    for key in handle.keys():
                        if key in weight_map:
                            raise ValueError(f"tensor {key!r} is stored in both {weight_map[key]} and {name}")
                        weight_map[key] = name
        self.weight_map = weight_map
        self._handles: Dict[str, Any] = {}

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"shard {full!r} named by the index is missing")
            self._handles[file] = safe_open(full, framework="pt")
        return self._handles[file]

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self.weight_map[key]).get_tensor(key)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, tensor), shard by shard, so pages of one shard are touched together."""
        for file in self.files:
            for key in sorted(k for k, f in self.weight_map.items() if f == file):
                yield key, self.get(key)
            self._handles.pop(file, None)  # drop the mapping of a finished shard

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- writing -------------------------------------------------------------------------------------
class ShardedSafetensorsWriter:
    """Write (name, tensor) pairs into shards of at most `max_shard_bytes` (a bigger tensor gets its own).

    Shards are written as they fill; `close()` names them `model-0000k-of-0000N.safetensors` (or
    `model.safetensors` when there is one) and writes the index json.
    """

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Optional[Dict[str, str]] = None) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[List[str]] = []
        self._seen: set = set()
        self._names: Optional[List[str]] = None
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._names is not None:
            raise RuntimeError("writer already closed")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        # One private contiguous CPU copy: safetensors refuses tensors sharing storage (expert
        # slices of one stacked parameter), and the caller may go on changing its tensor.
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach())
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_size += size

    def _tmp_name(self, k: int) -> str:
        return os.path.join(self.directory, f".tmp-shard-{k:05d}.safetensors")

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, self._tmp_name(len(self._shards)), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Finish writing (idempotent); returns the shard file names."""
        if self._names is not None:
            return self._names
        self._flush()
        n = len(self._shards)
        names = [SINGLE_NAME] if n <= 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        if n == 0:
            save_file({}, os.path.join(self.directory, SINGLE_NAME), metadata=self.metadata)
        for k, name in enumerate(names[:n]):
            os.replace(self._tmp_name(k), os.path.join(self.directory, name))
        index_path = os.path.join(self.directory, INDEX_NAME)
        if n > 1:
            weight_map = {key: names[k] for k, keys in enumerate(self._shards) for key in keys}
            with open(index_path, "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        elif os.path.exists(index_path):
            os.remove(index_path)  # a stale index from an earlier, larger write
        self._names = names
        return names

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()


# ---- empty model ---------------------------------------------------------------------------------
def build_empty_model(config: DeepSeekConfig, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """DeepSeekModel with UNINITIALISED storage of `dtype` on `device`, built without a random init.

    Why: loading a checkpoint into a normally built model holds two copies at once and spends
    minutes on normal_() for large models. The model is built on the meta device, cast there
    (free), then given real storage; non-persistent state that `to_empty` leaves as garbage (load
    counters, the rotary inverse frequencies, which are a plain attribute) is rebuilt.
    The caller must fill every persistent tensor.
    """
    from megatron.core.models.deepseek.model import DeepSeekModel  # local: model imports MoE modules
    from megatron.core.transformer.rope import RotaryEmbedding, rope_inv_freq

    with torch.device("meta"):
        model = DeepSeekModel(config)
    model.to(dtype=dtype)  # the router keeps its fp32 buffers
    model.to_empty(device=device)
    persistent = set(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in persistent:
                buf.zero_()  # accumulators (e.g. router.local_tokens_per_expert) start at zero
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(module.dim, module.rope)
            module._cache.clear()
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise RuntimeError(
                    f"{type(module).__name__}.{attr} is a plain tensor attribute left on the meta device; "
                    "build_empty_model must learn to rebuild it"
                )
    return model


def persistent_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Our checkpoint's tensors: the state dict without the tied head duplicate."""
    state = model.state_dict(keep_vars=True)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("output_layer.weight", None)
    return state


def fill_tensors(targets: Mapping[str, torch.Tensor], source: NamedTensors, what: str) -> None:
    """Copy every `source` tensor into the same-named target (casting dtype, moving device); strict."""
    missing, unexpected, bad_shape = set(targets), [], []
    with torch.no_grad():
        for name, tensor in source:
            target = targets.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
            target.copy_(tensor)
            missing.discard(name)
    raise_on_mismatch(what, sorted(missing), sorted(unexpected), bad_shape)


def raise_on_mismatch(what: str, missing: List[str], unexpected: List[str], bad_shape: List[str], limit: int = 40) -> None:
    if not (missing or unexpected or bad_shape):
        return

    def show(items: List[str]) -> str:
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return "\n    " + "\n    ".join(items[:limit]) + more

    parts = [f"{what} does not match the model:"]
    if missing:
        parts.append(f"  missing ({len(missing)}):{show(missing)}")
    if unexpected:
        parts.append(f"  unexpected ({len(unexpected)}):{show(unexpected)}")
    if bad_shape:
        parts.append(f"  wrong shape ({len(bad_shape)}):{show(bad_shape)}")
    raise ValueError("\n".join(parts))


# ---- our checkpoint ------------------------------------------------------------------------------
def save_checkpoint(
    model_or_tensors: Union[nn.Module, Mapping[str, torch.Tensor], NamedTensors],
    config: DeepSeekConfig,
    directory: str,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> List[str]:
    """Write our checkpoint format (module docstring) from a model, a state dict or a (name, tensor)
    iterator (streamed: nothing beyond one shard is held). Returns the shard file names."""
    if isinstance(model_or_tensors, nn.Module):
        tensors: NamedTensors = persistent_tensors(model_or_tensors).items()
    elif isinstance(model_or_tensors, Mapping):
        tensors = model_or_tensors.items()
    else:
        tensors = model_or_tensors
    writer = ShardedSafetensorsWriter(directory, max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    names = writer.close()
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config_to_json_dict(config), f, indent=2)
    return names


def load_checkpoint(
    directory: str, dtype: Optional[torch.dtype] = torch.float32, device: Union[str, torch.device] = "cpu"
) -> Tuple[nn.Module, DeepSeekConfig]:
    """(model, config) from our checkpoint format, streaming one tensor at a time; strict on names."""
    config = read_our_config(directory)
    model = build_empty_model(config, dtype or torch.float32, device)
    with SafetensorsReader(directory) as reader:
        fill_tensors(persistent_tensors(model), reader.items(), f"checkpoint {directory!r}")
    return model, config
