"""Training checkpoints <-> one-process models (export, generation, HF conversion).

- `export_full_state_dict(DIR)`: every model tensor of a checkpoint of any layout, full, by our
  parameter names (the fused dense gate_up back to [2F, H]; vocabulary rows as stored, i.e. the
  logical rows only).
- `load_full_model(DIR)`: a single-process DeepSeekModel built from the checkpoint's saved
  arguments and filled tensor by tensor (uninitialised storage, no second copy of the model).
- `load_any_model(DIR)`: the same for a training checkpoint or the single-process hf_io format,
  saying which it found (`tools/compare_with_hf.py`, `tools/convert_hf_checkpoint.py export`).
- `save_model_checkpoint(model, config, DIR)`: write one process's model as a weights-only
  training checkpoint at iteration 0 with the model's arguments (`convert_hf_checkpoint.py
  import`), which training loads with --load (+ --finetune / --use-checkpoint-args), verify
  checks, and export reads back exactly.
No collectives: these run in one process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from megatron.core.models.deepseek.sharding import ShardInfo, placement_of
from megatron.training import checkpoint_io as io
from megatron.training.checkpoint_format import DEFAULT_BUFFER_BYTES, CheckpointReader, Index, read_index
from megatron.training.checkpoint_io import CheckpointError


def _open(load_dir: str) -> Tuple[str, Index, Dict[str, Any]]:
    from megatron.training.checkpoint_format import read_common

    path = io.resolve(load_dir)
    if path is None:
        raise CheckpointError(f"{load_dir}: no training checkpoint (no {io.TRACKER_NAME} and no {io.COMMON_NAME})")
    index = read_index(path)
    return path, index, read_common(path, index)


def export_full_state_dict(load_dir: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Dict[str, torch.Tensor]:
    """Full tensors of every model tensor of a checkpoint of any layout (holds the whole model)."""
    _, index, _ = _open(load_dir)
    out: Dict[str, torch.Tensor] = {}
    with CheckpointReader(index, buffer_bytes) as reader:
        for key, entry in index.tensors.items():
            if not key.startswith(io.MODEL_PREFIX):
                continue
            t = torch.empty(entry.shape, dtype=entry.dtype)
            if reader.read_into(key, (0,) * len(entry.shape), entry.shape, t) != t.numel():
                raise CheckpointError(f"{index.directory}: {key} is incomplete {index.where()}")
            name = key[len(io.MODEL_PREFIX):]
            if name.endswith("gate_up_proj.weight") and t.dim() == 3:
                t = t.reshape(t.shape[0] * t.shape[1], t.shape[2])
            out[name] = t
    return out


def _model_config(load_dir: str, index: Index, common: Dict[str, Any]) -> Any:
    """The DeepSeekConfig of a checkpoint: "model_config" (weights-only checkpoints) or the run
    arguments' model section."""
    from megatron.core.models.deepseek.hf_io import config_from_json_dict
    from megatron.training.config import from_flat_dict

    where = os.path.join(index.directory, io.COMMON_NAME)
    args, model_config = common.get("args"), common.get("model_config")
    if not args and not model_config:
        raise CheckpointError(f"{where}: no saved run arguments; cannot rebuild the model")
    try:
        config = config_from_json_dict(model_config) if model_config else from_flat_dict(args, strict=False).model
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: saved model arguments unusable: {exc}") from None
    embedding = index.tensors.get(io.MODEL_PREFIX + "embedding.weight")
    if embedding is not None:  # the stored (logical) vocabulary, whatever the run padded it to
        config = dataclasses.replace(config, vocab_size=int(embedding.shape[0]))
    if hasattr(config, "make_vocab_size_divisible_by"):
        # One process needs no padding for tensor-parallel divisibility: rows = the logical vocabulary.
        config = dataclasses.replace(config, make_vocab_size_divisible_by=1)
    return config


def load_full_model(load_dir: str, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                    buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Tuple[nn.Module, Any]:
    """(DeepSeekModel, DeepSeekConfig) holding a training checkpoint of any layout, in one process.

    `dtype` defaults to the stored embedding's dtype (the router's fp32 state stays fp32)."""
    from megatron.core.models.deepseek.hf_io import build_empty_model, persistent_tensors
    from megatron.training.checkpoint_shards import check_shape, read_placed

    _, index, common = _open(load_dir)
    config = _model_config(load_dir, index, common)
    embedding = index.tensors.get(io.MODEL_PREFIX + "embedding.weight")
    model = build_empty_model(config, dtype or (embedding.dtype if embedding else torch.float32), device)
    targets = persistent_tensors(model)
    stored = {k[len(io.MODEL_PREFIX):] for k in index.tensors if k.startswith(io.MODEL_PREFIX)}
    missing, extra = sorted(set(targets) - stored), sorted(stored - set(targets))
    if missing or extra:
        raise CheckpointError(
            f"{index.directory}: the checkpoint's tensors do not match the model its arguments describe "
            f"(missing {missing[:5]}, unexpected {extra[:5]}) {index.where()}"
        )
    with torch.no_grad(), CheckpointReader(index, buffer_bytes) as reader:
        for name, t in targets.items():
            key = io.MODEL_PREFIX + name
            pl = placement_of(name, t, ShardInfo())
            check_shape(index, key, pl)
            flat = t.data.view(-1)
            read_placed(reader, key, pl, flat, 0, 0, flat.numel())
    return model, config


def describe(load_dir: str) -> str:
    """'training checkpoint (iteration N)' / 'weights-only ...' / 'single-process hf_io ...'."""
    if io.resolve(load_dir) is None:
        if io.is_hf_io_dir(load_dir):
            return "single-process model checkpoint (config.json + safetensors)"
        raise CheckpointError(f"{load_dir}: neither a training checkpoint nor a single-process model checkpoint")
    path, index, common = _open(load_dir)
    kind = "weights-only training checkpoint (imported)" if common.get("weights_only") else "training checkpoint"
    return f"{kind}, iteration {index.iteration}, saved by {common.get('world_size')} rank(s): {path}"


def load_any_model(load_dir: str, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[nn.Module, Any, str]:
    """(model, config, description) from a training checkpoint or the single-process hf_io format."""
    what = describe(load_dir)
    if what.startswith("single-process"):
        from megatron.core.models.deepseek.hf_io import load_checkpoint

        model, config = load_checkpoint(load_dir, dtype, device)
        return model, config, what
    model, config = load_full_model(load_dir, dtype, device)
    return model, config, what


def infer_model_type(config: Any) -> str:
    """HF model type of a config: softmax routing is DeepSeek-V2's, sigmoid routing V3's."""
    return "deepseek_v2" if config.moe.score_function == "softmax" else "deepseek_v3"


def save_model_checkpoint(model: nn.Module, config: Any, output_dir: str, iteration: int = 0) -> str:
    """Write `model` (one process, all tensors) as a weights-only training checkpoint.

    common.json records the model section of the run arguments ("args_scope": "model"; with
    --use-checkpoint-args they are merged over the run's own arguments) and the DeepSeekConfig
    itself ("model_config", as in hf_io's config.json)."""
    from megatron.training.checkpointing import _save
    from megatron.training.config import flatten_dataclass

    from megatron.core.models.deepseek.hf_io import config_to_json_dict

    extra = {"args": flatten_dataclass(config, "model."), "args_scope": "model", "weights_only": True,
             "model_config": config_to_json_dict(config), "source": "tools/convert_hf_checkpoint.py import"}
    from megatron.training.checkpoint_format import DEFAULT_BLOCK_BYTES

    return _save(output_dir, iteration, [model], None, None, None, None, None, False, False, DEFAULT_BUFFER_BYTES,
                 DEFAULT_BLOCK_BYTES, extra)
