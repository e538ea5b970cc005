"""Readers of Megatron's data-args files, for blends too long for a command line.

* `--data-args-path FILE`: FILE holds what `--data-path` would take: one prefix, or
  weight/prefix pairs, separated by any whitespace (newlines included), as Megatron reads it with
  `f.read().split()`. Lines whose first non-blank character is `#` are comments here.
* `--per-split-data-args-path FILE.json`: {"train": [...], "valid": [...], "test": [...]}, each
  value a `--data-path` list for that split (a list of strings, or one whitespace-separated
  string, as Megatron accepts); a split left out gets no data.

Both check the shape of every list (`dataset_config.parse_data_path`) and raise ValueError with
the file, and the split, at fault. The lists they return are what `--data-path` /
`--train-data-path`-style values are, so callers pass them on unchanged.
"""

from __future__ import annotations

import json
import numbers
from typing import Dict, List

from megatron.core.datasets.dataset_config import parse_data_path

SPLITS = ("train", "valid", "test")


def _check_blend(values: List[str], where: str) -> None:
    try:
        parse_data_path(values)
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).replace('--data-path ', '', 1)}") from None


def read_data_args_file(path: str) -> List[str]:
    """The `--data-path` values held in `path` (Megatron's `--data-args-path` format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"--data-args-path {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--data-args-path {path}: cannot read it: {exc}") from None
    values = [word for line in text.splitlines() if not line.lstrip().startswith("#") for word in line.split()]
    if not values:
        raise ValueError(f"--data-args-path {path}: the file lists no datasets (expected a prefix, or weight/prefix pairs)")
    _check_blend(values, f"--data-args-path {path}")
    return values


def _split_values(path: str, split: str, value: object) -> List[str]:
    where = f"--per-split-data-args-path {path}: {split!r}"
    if isinstance(value, str):
        values = value.split()
    elif isinstance(value, list):
        values = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                values.append(item)
            elif isinstance(item, numbers.Real) and not isinstance(item, bool):
                values.append(repr(item))  # a weight written as a JSON number
            else:
                raise ValueError(f"{where}: item {i} is {type(item).__name__} {item!r}, expected a weight or a path prefix")
    else:
        raise ValueError(f"{where} must be a list of weights and prefixes (or one string), got {type(value).__name__}")
    if values:
        _check_blend(values, where)
    return values


def read_per_split_data_args_file(path: str) -> Dict[str, List[str]]:
    """{"train": [...], "valid": [...], "test": [...]} from `path` (Megatron's
    `--per-split-data-args-path` format); a split the file leaves out maps to []."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--per-split-data-args-path {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--per-split-data-args-path {path}: not valid JSON: {exc.msg} (line {exc.lineno}, "
                         f"column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--per-split-data-args-path {path}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--per-split-data-args-path {path}: expected a JSON object with keys "
                         f"{', '.join(map(repr, SPLITS))}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise ValueError(f"--per-split-data-args-path {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"the keys are {', '.join(map(repr, SPLITS))}")
    out = {split: _split_values(path, split, data[split]) if split in data else [] for split in SPLITS}
    if not any(out.values()):
        raise ValueError(f"--per-split-data-args-path {path}: no split lists any dataset")
    return out
