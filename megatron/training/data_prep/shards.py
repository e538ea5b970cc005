"""Sharded, resumable preprocessing: many inputs -> one `.bin/.idx` pair per work unit.

Why: a corpus of many large files takes days on one machine, a kill should not lose finished
work, and several machines should split it without talking to each other. The work units are a
pure function of the inputs and flags: each input file in order, JSON-lines files (not gzip)
further cut into byte ranges of `--shard-size-mb` (a line belongs to the range its first byte is
in). Process `--shard-index i` of `--num-shards n` takes units u with u % n == i. Each unit is
preprocessed on its own into `<prefix>_shards/unit_NNNNN_<key>_<level>.bin/.idx` (committed like
any pair), then its record (sizes, SHA-256, counts) is written atomically; `--resume` skips units
whose record verifies. The manifest format and its readers are in
`megatron/core/datasets/shard_manifest.py`; `tools/merge_datasets.py --manifest` joins the units
in order, which gives exactly the output of an unsharded run over the same inputs.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional, TextIO

from megatron.core.datasets.index_cache import atomic_write_text
from megatron.core.datasets.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megatron.core.datasets.shard_manifest import (
    MANIFEST_VERSION,
    PLAN_NAME,
    ShardManifestError,
    file_sha256,
    record_path,
    shard_folder,
    unit_prefix,
    verify_record,
)
from megatron.training.data_prep.inputs import InputSource, JsonLinesSource, open_inputs, source_for_file
from megatron.training.data_prep.pipeline import PreprocessConfig, preprocess
from megatron.training.data_prep.sentences import SentenceSplitter

_FINGERPRINT_TEXT = "Sharded preprocessing checks that every process uses the same tokenizer: 12345 héllo."


@dataclass
class WorkUnit:
    index: int
    path: str
    byte_range: Optional[List[int]]  # [start, end) of a JSON-lines file, or None: the whole file

    def source(self) -> InputSource:
        if self.byte_range is not None:
            return JsonLinesSource(self.path, (self.byte_range[0], self.byte_range[1]))
        return source_for_file(self.path)

    def describe(self) -> str:
        if self.byte_range is None:
            return self.path
        return f"{self.path} bytes {self.byte_range[0]:,}-{self.byte_range[1]:,}"


def plan_units(spec: str, shard_bytes: Optional[int]) -> List[WorkUnit]:
    """The work units of `--input` (see the module docstring), numbered in input order."""
    units: List[WorkUnit] = []
    for source in open_inputs(spec):
        path, size = source.path, source.size
        if shard_bytes and isinstance(source, JsonLinesSource) and not path.endswith(".gz") and size > shard_bytes:
            for start in range(0, size, shard_bytes):
                units.append(WorkUnit(len(units), path, [start, min(size, start + shard_bytes)]))
        else:
            units.append(WorkUnit(len(units), path, None))
    return units


def _settings(config: PreprocessConfig, tokenizer, shard_bytes: Optional[int]) -> dict:
    """Everything besides the inputs that determines the output files."""
    return {
        "json_keys": list(config.json_keys), "split_sentences": config.split_sentences,
        "keep_newlines": config.keep_newlines, "append_eod": config.append_eod, "lang": config.lang,
        "skip_bad_lines": config.skip_bad_lines, "shard_bytes": shard_bytes,
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size),
                      "eod": int(tokenizer.eod) if config.append_eod else None,
                      "probe_ids": [int(i) for i in tokenizer.tokenize(_FINGERPRINT_TEXT)]},
    }


def _write_or_check_plan(folder: str, plan: dict) -> None:
    path = os.path.join(folder, PLAN_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
        differ = sorted(k for k in set(plan) | set(existing) if plan.get(k) != existing.get(k))
        if differ:
            raise ShardManifestError(
                f"{path} was written for other {' and '.join(differ)} than this run's; use another --output-prefix, "
                f"or delete {folder} to start over"
            )
        return
    atomic_write_text(path, json.dumps(plan, indent=1, sort_keys=True))


def _record(unit: WorkUnit, config: PreprocessConfig, folder: str, level: str) -> dict:
    keys = {}
    for key in config.json_keys:
        prefix = unit_prefix(folder, unit.index, key, level)
        dataset = IndexedDataset(prefix)
        counts = {"documents": dataset.num_documents, "sequences": len(dataset),
                  "tokens": int(dataset.sequence_lengths.sum(dtype="int64"))}
        dataset.close()
        keys[key] = {"prefix": prefix, **counts}
        for ext, path in (("bin", data_file_path(prefix)), ("idx", index_file_path(prefix))):
            keys[key][f"{ext}_size"] = os.path.getsize(path)
            keys[key][f"{ext}_sha256"] = file_sha256(path)
    return {"unit": unit.index, "input": asdict(unit), "keys": keys}


def run_sharded(
    config: PreprocessConfig,
    tokenizer,
    splitter: Optional[SentenceSplitter] = None,
    shard_bytes: Optional[int] = None,
    shard_index: int = 0,
    num_shards: int = 1,
    resume: bool = False,
    stream: Optional[TextIO] = None,
) -> dict:
    """Preprocess this process's units of a sharded run (see the module docstring). Returns
    {"units": total, "assigned": n, "skipped": verified units not redone, "finished": all done}."""
    stream = stream or sys.stderr
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards), got {shard_index} of {num_shards}")
    if config.partitions > 1:
        raise ValueError("--partitions does not apply to sharded preprocessing (each unit keeps input order)")
    config.validate()
    units = plan_units(config.input, shard_bytes)
    folder = shard_folder(config.output_prefix)
    os.makedirs(folder, exist_ok=True)
    level = "sentence" if config.split_sentences else "document"
    plan = {"version": MANIFEST_VERSION, "keys": list(config.json_keys), "level": level,
            "units": [asdict(u) for u in units], "inputs": {u.path: os.path.getsize(u.path) for u in units},
            "settings": _settings(config, tokenizer, shard_bytes)}
    _write_or_check_plan(folder, plan)
    assigned = [u for u in units if u.index % num_shards == shard_index]
    print(f"sharded preprocessing: {len(units)} units in {folder}; this process (shard {shard_index} of {num_shards}) "
          f"takes {len(assigned)}", file=stream, flush=True)
    skipped = done = 0
    for unit in assigned:
        if resume and verify_record(folder, unit.index) is not None:
            skipped += 1
            done += 1
            print(f"shard unit {unit.index}: already finished and verified, skipped ({done}/{len(assigned)} of this "
                  f"process)", file=stream, flush=True)
            continue
        if os.path.exists(record_path(folder, unit.index)):
            os.remove(record_path(folder, unit.index))  # redone: its old record must not vouch for new files
        unit_config = PreprocessConfig(**{**asdict(config), "input": unit.path,
                                          "output_prefix": os.path.join(folder, f"unit_{unit.index:05d}")})
        result = preprocess(unit_config, tokenizer, splitter, stream=io.StringIO(), sources=[unit.source()])
        atomic_write_text(record_path(folder, unit.index), json.dumps(_record(unit, config, folder, level), indent=1))
        done += 1
        finished = sum(os.path.exists(record_path(folder, u.index)) for u in units)
        bad = f", {result.bad_records:,} bad records skipped" if result.bad_records else ""
        print(f"shard unit {unit.index} done: {unit.describe()}, {result.documents:,} documents, {result.tokens:,} "
              f"tokens{bad} | {done}/{len(assigned)} of this process, {finished}/{len(units)} units finished",
              file=stream, flush=True)
    finished = sum(os.path.exists(record_path(folder, u.index)) for u in units)
    if finished == len(units):
        print(f"all {len(units)} units finished; merge them with: python tools/merge_datasets.py --manifest {folder} "
              f"--output-prefix {config.output_prefix}", file=stream, flush=True)
    else:
        print(f"{finished}/{len(units)} units finished; the others belong to other shards or are still running",
              file=stream, flush=True)
    return {"units": len(units), "assigned": len(assigned), "skipped": skipped, "finished": finished == len(units)}
