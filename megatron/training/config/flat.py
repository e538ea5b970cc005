"""A run configuration as a flat dict of JSON primitives, and back.

`to_flat_dict` / `from_flat_dict` turn a RunConfig into {"model.moe.num_experts": 256, ...} and
back. Checkpoints store that dict for --use-checkpoint-args: it is readable, diffable, and
loading it never unpickles arbitrary objects (values are type-checked against the annotations).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from megatron.core.config import RecomputeConfig

if TYPE_CHECKING:
    from megatron.training.config.run import RunConfig

FLAT_FORMAT = "megatron-deepseek-run-config/1"
_FORMAT_KEY = "__format__"

_PRIMITIVES = (type(None), bool, int, float, str)


def to_flat_dict(run: "RunConfig") -> Dict[str, Any]:
    """`run` as {"section.field": primitive or list of primitives}, plus a format key."""
    return {_FORMAT_KEY: FLAT_FORMAT, **flatten_dataclass(run)}


def flatten_dataclass(obj: Any, prefix: str = "", out: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Any (nested) dataclass of primitives as {"prefix.field": value}; TypeError otherwise."""
    out = {} if out is None else out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            flatten_dataclass(value, key + ".", out)
        elif isinstance(value, (tuple, list)):
            if not all(isinstance(v, _PRIMITIVES) for v in value):
                raise TypeError(f"{key}: only sequences of primitives can be stored, got {value!r}")
            out[key] = list(value)
        elif isinstance(value, _PRIMITIVES):
            out[key] = value
        else:
            raise TypeError(f"{key}: {type(value).__name__} is not JSON-safe")
    return out


def from_flat_dict(flat: Mapping[str, Any], strict: bool = True) -> "RunConfig":
    """Rebuild a RunConfig from `to_flat_dict` output (e.g. after a JSON round trip).

    Missing keys take the dataclass defaults (checkpoints written before a field existed);
    unknown keys are an error when `strict` (a typo or a newer writer), else ignored. Values are
    type-checked against the field annotations, so nothing but primitives is ever accepted.
    """
    fmt = flat.get(_FORMAT_KEY, FLAT_FORMAT)
    if fmt != FLAT_FORMAT:
        raise ValueError(f"unsupported run-config format {fmt!r}; this version reads {FLAT_FORMAT!r}")
    used = {_FORMAT_KEY}
    from megatron.training.config.run import RunConfig

    run = _build(RunConfig, flat, "", used)
    unknown = sorted(set(flat) - used)
    if strict and unknown:
        raise ValueError(f"unknown run-config keys: {', '.join(unknown)}")
    return run


def _hints(cls: type) -> Dict[str, Any]:
    from megatron.training.tokenizer import TokenizerConfig

    return typing.get_type_hints(cls, localns={"TokenizerConfig": TokenizerConfig, "RecomputeConfig": RecomputeConfig})


def _build(cls: type, flat: Mapping[str, Any], prefix: str, used: set) -> Any:
    hints = _hints(cls)
    kwargs: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required or any(k.startswith(key + ".") for k in flat):
                kwargs[f.name] = _build(tp, flat, key + ".", used)
        elif key in flat:
            used.add(key)
            kwargs[f.name] = _coerce(flat[key], tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (Optional / Tuple[X, ...] / primitives)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, float, str) and type(value) is tp:
        return value
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
