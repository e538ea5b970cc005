"""The manifest of a sharded preprocessing run, and what training and merging read from it.

A sharded run (`tools/preprocess_data.py --shard-size-mb N ...`) writes into the folder
`<output-prefix>_shards/`:

    plan.json                 the work units (input file, byte range), the keys and the settings
                              that determine the output; identical for every process of the run
    unit_00007_<key>_document.bin/.idx   the output pair of unit 7 for each key
    unit_00007.done.json      written (atomically) after unit 7's pairs are committed: per key the
                              pair's sizes, SHA-256 checksums and document / sequence / token counts

A unit is finished when its record exists and its files still match it. Units are numbered in
input order, so concatenating the finished pairs in unit order gives the output of an unsharded
run over the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

PLAN_NAME = "plan.json"
MANIFEST_VERSION = 1


class ShardManifestError(ValueError):
    """A shard folder is missing, foreign, unfinished or does not match its records."""


def shard_folder(output_prefix: str) -> str:
    return output_prefix + "_shards"


def unit_prefix(folder: str, unit: int, key: str, level: str) -> str:
    return os.path.join(folder, f"unit_{unit:05d}_{key}_{level}")


def record_path(folder: str, unit: int) -> str:
    return os.path.join(folder, f"unit_{unit:05d}.done.json")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def read_plan(folder: str) -> dict:
    path = os.path.join(folder, PLAN_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise ShardManifestError(f"{folder}: no {PLAN_NAME}; not the shard folder of a sharded preprocessing run") from None
    except ValueError as exc:
        raise ShardManifestError(f"{path}: unreadable ({exc}); rerun the sharded preprocessing") from None
    if plan.get("version") != MANIFEST_VERSION:
        raise ShardManifestError(f"{path}: manifest version {plan.get('version')!r}, expected {MANIFEST_VERSION}")
    return plan


def verify_record(folder: str, unit: int, checksums: bool = True) -> Optional[dict]:
    """The record of `unit` if it exists and its files match it (sizes, and SHA-256 when
    `checksums`), else None."""
    try:
        with open(record_path(folder, unit), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    for entry in record.get("keys", {}).values():
        for ext in ("bin", "idx"):
            path = entry["prefix"] + "." + ext
            if not os.path.isfile(path) or os.path.getsize(path) != entry[f"{ext}_size"]:
                return None
            if checksums and file_sha256(path) != entry[f"{ext}_sha256"]:
                return None
    return record


def finished_prefixes(folder: str, key: Optional[str] = None, checksums: bool = True) -> Dict[str, List[dict]]:
    """Per key, the finished units' entries (prefix, counts) in unit order. Raises
    ShardManifestError naming the units still missing (or whose files no longer match)."""
    plan = read_plan(folder)
    keys = [key] if key is not None else list(plan["keys"])
    if key is not None and key not in plan["keys"]:
        raise ShardManifestError(f"{folder}: no key {key!r} (keys: {', '.join(plan['keys'])})")
    out: Dict[str, List[dict]] = {k: [] for k in keys}
    missing = []
    for unit in range(len(plan["units"])):
        record = verify_record(folder, unit, checksums)
        if record is None:
            missing.append(unit)
            continue
        for k in keys:
            out[k].append(record["keys"][k])
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ShardManifestError(
            f"{folder}: {len(missing)} of {len(plan['units'])} units are not finished (units {shown}); run "
            f"tools/preprocess_data.py again with the same flags and --resume (with --shard-index/--num-shards "
            f"on several machines) to finish them"
        )
    return out


def manifest_data_path(folder: str, key: str = "text") -> List[str]:
    """A `--data-path` list over the finished pairs of one key: "tokens prefix" pairs, so that a
    blend samples each shard in proportion to its size (a blend of the shards is a different,
    equally valid, shuffle than the merged dataset)."""
    entries = finished_prefixes(folder, key, checksums=False)[key]
    return [v for e in entries if e["tokens"] > 0 for v in (str(e["tokens"]), e["prefix"])]
