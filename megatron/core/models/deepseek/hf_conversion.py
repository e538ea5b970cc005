"""Hugging Face DeepSeek-V3 / V2 checkpoints <-> our DeepSeekModel, tensor by tensor.

Name mapping (ours -> HF; L = num_hidden_layers, d = MTP depth, E experts, I = ffn width):

    embedding.weight                          model.embed_tokens.weight
    final_layernorm.weight                    model.norm.weight
    output_layer.weight                       lm_head.weight            (absent when tied)
    layers.{i}.X                              model.layers.{i}.X'
    mtp.{d}.enorm|hnorm|eh_proj.weight        model.layers.{L+d}.enorm|hnorm|eh_proj.weight
    mtp.{d}.final_layernorm.weight            model.layers.{L+d}.shared_head.norm.weight
    mtp.{d}.layer.X                           model.layers.{L+d}.X'

and inside a decoder layer (X -> X'), everything is the same name except:

    mlp.gate_up_proj.weight [2I, H]           mlp.gate_proj.weight = rows [:I], mlp.up_proj.weight = rows [I:]
    mlp.shared_experts.gate_up_proj.weight    mlp.shared_experts.{gate,up}_proj.weight (same split)
    mlp.router.weight [E, H]                  mlp.gate.weight
    mlp.router.expert_bias [E] (fp32)         mlp.gate.e_score_correction_bias (V3 only)
    mlp.experts.gate_up_proj [E, 2I, H]       mlp.experts.{e}.gate_proj.weight = [e, :I], up_proj = [e, I:]
    mlp.experts.down_proj [E, H, I]           mlp.experts.{e}.down_proj.weight = [e]

HF checkpoints store experts per expert on disk (DeepSeek's releases and `save_pretrained`);
transformers v5 fuses them in memory as `mlp.experts.gate_up_proj` / `down_proj`, with exactly
our layout. Import accepts both spellings (so an HF model's `state_dict()` or `named_parameters`
gradients convert too); export writes the on-disk per-expert spelling. Import skips what the
model does not need: the embedding / head copies inside released MTP layers
(`model.layers.{L+d}.embed_tokens.weight`, `shared_head.head.weight`), old `rotary_emb.inv_freq`
buffers, and dequantises DeepSeek's block-FP8 weights with their `weight_scale_inv`.

HF's DeepseekV3ForCausalLM builds no MTP layers, so `save_pretrained` drops them: importing such a
checkpoint (config says num_nextn_predict_layers > 0, no layer-L keys) builds the model without
MTP unless `missing_mtp="error"`. Our checkpoint format: see hf_io.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from megatron.core.config import DeepSeekConfig
from megatron.core.models.deepseek.hf_config import config_from_hf, config_to_hf_dict
from megatron.core.models.deepseek.hf_io import (
    CONFIG_NAME,
    DEFAULT_SHARD_BYTES,
    NamedTensors,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    build_empty_model,
    persistent_tensors,
    raise_on_mismatch,
    read_our_config,
)

Index = Tuple[Union[int, slice], ...]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclass(frozen=True)
class Piece:
    """One HF tensor = our tensor[index] (index () = the whole tensor)."""

    hf_key: str
    index: Index = ()


# ---- the mapping ---------------------------------------------------------------------------------
def _split_rows(hf_prefix: str, suffix: str, rows: int) -> List[Piece]:
    half = rows // 2
    return [Piece(f"{hf_prefix}gate_proj.{suffix}", (slice(0, half),)), Piece(f"{hf_prefix}up_proj.{suffix}", (slice(half, rows),))]


def _layer_pieces(hf_prefix: str, rest: str, shape: Tuple[int, ...]) -> Tuple[List[Piece], Optional[str]]:
    """Pieces of one decoder-layer tensor (`rest` = name inside the layer) and its fused HF alias."""
    fused = re.fullmatch(r"mlp\.(shared_experts\.)?gate_up_proj\.(weight|bias)", rest)
    if fused:
        return _split_rows(f"{hf_prefix}mlp.{fused.group(1) or ''}", fused.group(2), shape[0]), None
    if rest == "mlp.router.weight":
        return [Piece(f"{hf_prefix}mlp.gate.weight")], None
    if rest == "mlp.router.expert_bias":
        return [Piece(f"{hf_prefix}mlp.gate.e_score_correction_bias")], None
    if rest == "mlp.experts.gate_up_proj":
        pieces = []
        for e in range(shape[0]):  # [E, 2I, H]: expert e's gate = [e, :I], up = [e, I:]
            pieces += [Piece(p.hf_key, (e,) + p.index) for p in _split_rows(f"{hf_prefix}mlp.experts.{e}.", "weight", shape[1])]
        return pieces, f"{hf_prefix}{rest}"
    if rest == "mlp.experts.down_proj":
        return [Piece(f"{hf_prefix}mlp.experts.{e}.down_proj.weight", (e,)) for e in range(shape[0])], f"{hf_prefix}{rest}"
    if "router" in rest or "experts." in rest.replace("shared_experts.", "") or "gate_up" in rest:
        raise ValueError(f"no HF name known for layer tensor {rest!r}: teach hf_conversion._layer_pieces")
    return [Piece(hf_prefix + rest)], None


def hf_layout(shapes: Mapping[str, Tuple[int, ...]], config: DeepSeekConfig) -> Tuple[Dict[str, List[Piece]], Dict[str, str]]:
    """For each of our tensors (name -> shape): its HF pieces; plus fused HF alias key -> our name."""
    layout: Dict[str, List[Piece]] = {}
    aliases: Dict[str, str] = {}
    top = {"embedding.weight": "model.embed_tokens.weight", "final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
    for name, shape in shapes.items():
        shape = tuple(shape)
        alias = None
        if name in top:
            pieces = [Piece(top[name])]
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            pieces, alias = _layer_pieces(f"model.layers.{m.group(1)}.", m.group(2), shape)
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            hf_prefix = f"model.layers.{config.num_layers + int(m.group(1))}."
            rest = m.group(2)
            if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
                pieces = [Piece(hf_prefix + rest)]
            elif rest == "final_layernorm.weight":
                pieces = [Piece(hf_prefix + "shared_head.norm.weight")]
            elif rest.startswith("layer."):
                pieces, alias = _layer_pieces(hf_prefix, rest[len("layer."):], shape)
            else:
                raise ValueError(f"no HF name known for MTP tensor {name!r}")
        else:
            raise ValueError(f"no HF name known for tensor {name!r}")
        layout[name] = pieces
        if alias is not None:
            aliases[alias] = name
    return layout, aliases


def meta_shapes(config: DeepSeekConfig) -> Dict[str, Tuple[int, ...]]:
    """Our persistent tensor names and shapes for `config`, from a model on the meta device (no memory)."""
    from megatron.core.models.deepseek.model import DeepSeekModel

    with torch.device("meta"):
        model = DeepSeekModel(config)
    return {name: tuple(t.shape) for name, t in persistent_tensors(model).items()}


def _is_skipped(key: str, config: DeepSeekConfig) -> bool:
    """HF keys our model has no use for (see module docstring)."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    if config.tie_word_embeddings and key == "lm_head.weight":
        return True
    m = _LAYER_KEY.match(key)
    return bool(m and int(m.group(1)) >= config.num_layers and m.group(2) in ("embed_tokens.weight", "shared_head.head.weight"))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek block FP8: weight [R, C] fp8 * scale_inv [ceil(R/b0), ceil(C/b1)] per block -> fp32 [R, C]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def iter_hf_tensors(reader: SafetensorsReader, config: DeepSeekConfig, fp8_block: Tuple[int, int] = (128, 128)) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF key, tensor) of a checkpoint, without skipped keys, with FP8 weights dequantised."""
    for key, tensor in reader.items():
        if key.endswith("_scale_inv") or _is_skipped(key, config):
            continue
        if tensor.dtype in _FP8_DTYPES:
            scale_key = key + "_scale_inv"
            if scale_key not in reader:
                raise ValueError(f"{key} is FP8 but the checkpoint has no {scale_key}")
            tensor = dequantize_fp8(tensor, reader.get(scale_key), fp8_block)
        yield key, tensor


# ---- import --------------------------------------------------------------------------------------
def assign_hf_tensors(targets: Mapping[str, torch.Tensor], hf_tensors: NamedTensors, config: DeepSeekConfig, what: str = "HF checkpoint") -> None:
    """Copy HF tensors into our tensors `targets` (name -> tensor, e.g. the model's parameters).

    Strict: every piece of every target must be given exactly once (per-expert or fused); unknown
    keys, shape mismatches, and pieces given twice raise one error listing them all.
    """
    layout, aliases = hf_layout({n: tuple(t.shape) for n, t in targets.items()}, config)
    inverse = {p.hf_key: (name, p.index) for name, pieces in layout.items() for p in pieces}
    pending = {p.hf_key for pieces in layout.values() for p in pieces}
    unexpected: List[str] = []
    bad: List[str] = []
    with torch.no_grad():
        for key, tensor in hf_tensors:
            if key in aliases:
                name = aliases[key]
                cover: Iterable[Tuple[str, Index]] = [(p.hf_key, p.index) for p in layout[name]]
                dest = targets[name]
            elif key in inverse:
                name, index = inverse[key]
                cover, dest = [(key, index)], targets[name][index]
            else:
                unexpected.append(key)
                continue
            keys = [k for k, _ in cover]
            twice = [k for k in keys if k not in pending]
            if twice:
                bad.append(f"{key}: given twice (both per-expert and fused keys?)")
                continue
            if tuple(dest.shape) != tuple(tensor.shape):
                bad.append(f"{key}: checkpoint {tuple(tensor.shape)} vs expected {tuple(dest.shape)} (for our {name})")
                pending.difference_update(keys)  # reported once, as a wrong shape
                continue
            dest.copy_(tensor)
            pending.difference_update(keys)
    raise_on_mismatch(what, sorted(pending), sorted(unexpected), bad)


def hf_to_ours(hf_tensors: Union[Mapping[str, torch.Tensor], NamedTensors], config: DeepSeekConfig, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """In-memory conversion (tests, gradients): HF name -> tensor into our name -> new tensor."""
    items = list(hf_tensors.items() if isinstance(hf_tensors, Mapping) else hf_tensors)
    first = items[0][1] if items else torch.empty(0)
    targets = {}
    for name, shape in meta_shapes(config).items():
        t_dtype = torch.float32 if name.endswith("expert_bias") else (dtype or first.dtype)
        targets[name] = torch.zeros(shape, dtype=t_dtype, device=first.device)
    assign_hf_tensors(targets, items, config, "HF tensors")
    return targets


def _mtp_depths_present(keys: Iterable[str], config: DeepSeekConfig) -> int:
    depths = {int(m.group(1)) - config.num_layers for k in keys if (m := _LAYER_KEY.match(k)) and int(m.group(1)) >= config.num_layers}
    return len(depths)


def load_hf_checkpoint(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    *,
    missing_mtp: str = "drop",
    **config_overrides: Any,
) -> Tuple[nn.Module, DeepSeekConfig]:
    """(DeepSeekModel, DeepSeekConfig) from an HF DeepSeek-V3 / V2 checkpoint directory.

    Streams tensor by tensor into an empty model (`build_empty_model`), so peak memory is about the
    model plus what one tensor needs. `missing_mtp`: "drop" builds no MTP depth that the checkpoint
    lacks (HF's save_pretrained never writes them) with a warning; "error" raises.
    """
    if missing_mtp not in ("drop", "error"):
        raise ValueError(f"missing_mtp must be 'drop' or 'error', got {missing_mtp!r}")
    config = config_from_hf(path, **config_overrides)
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        hf_config = json.load(f)
    block = tuple((hf_config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    with SafetensorsReader(path) as reader:
        present = _mtp_depths_present(reader.keys(), config)
        if present < config.mtp.num_layers:
            if missing_mtp == "error":
                raise ValueError(f"config has {config.mtp.num_layers} MTP depths but {path!r} holds {present}")
            warnings.warn(
                f"{path!r} holds {present} of the config's {config.mtp.num_layers} MTP depths "
                "(HF's save_pretrained drops them): building the model with that many",
                stacklevel=2,
            )
            config = dataclasses.replace(config, mtp=dataclasses.replace(config.mtp, num_layers=present))
        model = build_empty_model(config, dtype, device)
        assign_hf_tensors(persistent_tensors(model), iter_hf_tensors(reader, config, block), config, f"HF checkpoint {path!r}")
    return model, config


# ---- export --------------------------------------------------------------------------------------
def iter_ours_to_hf(tensors: Mapping[str, torch.Tensor], config: DeepSeekConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF on-disk key, tensor view) for each of our tensors; `tensors` may be lazy (`get` on demand)."""
    shapes = meta_shapes(config)
    missing = sorted(set(shapes) - set(tensors.keys()))
    extra = sorted(set(tensors.keys()) - set(shapes) - ({"output_layer.weight"} if config.tie_word_embeddings else set()))
    raise_on_mismatch("our tensors", missing, extra, [])
    layout, _ = hf_layout(shapes, config)
    for name, pieces in layout.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, config says {shapes[name]}")
        for piece in pieces:
            yield piece.hf_key, tensor[piece.index]


class _LazyTensors(Mapping):
    """Mapping view of a SafetensorsReader: tensors are read only when indexed."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.reader = reader

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reader.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader.keys())


def export_hf_checkpoint(
    source: Union[nn.Module, str],
    output_dir: str,
    model_type: str = "deepseek_v3",
    *,
    config: Optional[DeepSeekConfig] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> List[str]:
    """Write an HF checkpoint (per-expert keys, config.json) from our model or checkpoint directory.

    Streams: one of our tensors is read at a time, split into HF tensors, and written in shards of
    at most `max_shard_bytes`. `dtype` casts floating tensors (the expert bias stays fp32, as HF
    keeps it). MTP depths become layers num_hidden_layers + d. Returns the shard names.
    """
    reader: Optional[SafetensorsReader] = None
    if isinstance(source, nn.Module):
        config = config or source.config
        tensors: Mapping[str, torch.Tensor] = persistent_tensors(source)
    else:
        config = config or read_our_config(source)
        reader = SafetensorsReader(source)
        tensors = _LazyTensors(reader)
    hf_dict = config_to_hf_dict(config, model_type)
    writer = ShardedSafetensorsWriter(output_dir, max_shard_bytes)
    stored_dtype = None
    try:
        for key, tensor in iter_ours_to_hf(tensors, config):
            if dtype is not None and tensor.is_floating_point() and not key.endswith("e_score_correction_bias"):
                tensor = tensor.to(dtype)
            if not key.endswith("e_score_correction_bias"):
                stored_dtype = stored_dtype or tensor.dtype
            writer.add(key, tensor)
    finally:
        if reader is not None:
            reader.close()
    names = writer.close()
    hf_dict["dtype"] = str(stored_dtype or torch.float32).replace("torch.", "")
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(hf_dict, f, indent=2)
    return names
