"""Verification of training checkpoints (`tools/verify_checkpoint.py DIR`).

`verify_checkpoint(DIR)` accepts a save root (follows the tracker), an iteration directory, or a
single-process hf_io directory (config.json + safetensors), and says which it found. For a
training checkpoint it checks, raising CheckpointError naming the file and iteration:
- the tracker parses and names an existing iteration (or a moved-aside copy of it);
- index.json parses under the strict schema and matches its own checksum; common.json and every
  RNG file match their recorded checksums, and common.json agrees with the tracker and index;
- every data file exists, has the recorded size, and every block matches its sha256;
- every stored tensor is tiled exactly by its boxes (no element missing or stored twice);
- with optimizer state: exp_avg and exp_avg_sq of every trainable parameter, each the shape of
  its parameter; one RNG file per saving rank when RNG state was saved.
Nothing is unpickled: the directory is read as JSON and raw bytes only.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from megatron.training import checkpoint_io as io
from megatron.training.checkpoint_boxes import disjoint_cover
from megatron.training.checkpoint_format import CheckpointReader, read_common, read_index, sha256_text
from megatron.training.checkpoint_io import TRACKER_NAME, CheckpointError


def _verify_hf_io(directory: str) -> Dict[str, Any]:
    """The single-process format: config readable, every safetensors header and tensor readable."""
    from megatron.core.models.deepseek.hf_io import SafetensorsReader, read_our_config

    try:
        config = read_our_config(directory)
        count = 0
        with SafetensorsReader(directory) as reader:
            for _name, _tensor in reader.items():
                count += 1
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: single-process (hf_io) checkpoint unreadable: {exc}") from None
    return {"path": directory, "kind": "single-process model (config.json + safetensors)", "iteration": None,
            "model_tensors": count, "optimizer_tensors": 0, "world_size": 1, "num_layers": config.num_layers}


def verify_checkpoint(directory: str) -> Dict[str, Any]:
    """Check a checkpoint completely (see the module docstring); a summary dict when it is sound."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such directory")
    path = io.resolve(directory)
    if path is None:
        if io.is_hf_io_dir(directory):
            return _verify_hf_io(directory)
        raise CheckpointError(f"{directory}: no checkpoint (no {TRACKER_NAME}, no {io.COMMON_NAME}, no config.json)")
    index = read_index(path)
    common = read_common(path, index)
    where = index.where()
    if common["iteration"] != index.iteration:
        raise CheckpointError(f"{os.path.join(path, io.COMMON_NAME)}: iteration {common['iteration']}, index.json {where}")
    tracked = io.read_tracker(directory) if path != directory else None
    if tracked is not None and tracked != index.iteration:
        raise CheckpointError(f"{os.path.join(directory, TRACKER_NAME)}: says {tracked}, {path} holds iteration {index.iteration}")
    for rel, digest in sorted(index.aux_files.items()):
        if sha256_text(io.read_text(os.path.join(path, rel))) != digest:
            raise CheckpointError(f"{os.path.join(path, rel)}: checksum mismatch {where}: the file is corrupt")
    with CheckpointReader(index) as reader:
        for number in range(len(index.files)):
            reader.verify_file(number)
    for key, entry in index.tensors.items():
        problem = disjoint_cover(entry.shape, [(b.offsets, b.sizes) for b in entry.boxes])
        if problem:
            raise CheckpointError(f"{os.path.join(path, 'index.json')}: tensor {key!r}: {problem} {where}")
    model = {k[len(io.MODEL_PREFIX):]: e for k, e in index.tensors.items() if k.startswith(io.MODEL_PREFIX)}
    optim = [k for k in index.tensors if k.startswith(io.OPTIM_PREFIX)]
    if common.get("optimizer") is not None:
        missing: List[str] = []
        for name, entry in sorted(model.items()):
            for sub in ("exp_avg", "exp_avg_sq"):
                key = f"{io.OPTIM_PREFIX}{name}/{sub}"
                if entry.trainable and key not in index.tensors:
                    missing.append(key)
                elif key in index.tensors and index.tensors[key].shape != entry.shape:
                    raise CheckpointError(f"{os.path.join(path, 'index.json')}: {key} shape differs from its parameter {where}")
        for key in optim:
            if key[len(io.OPTIM_PREFIX):].rsplit("/", 1)[0] not in model:
                missing.append(io.MODEL_PREFIX + key[len(io.OPTIM_PREFIX):].rsplit("/", 1)[0])
        if missing:
            raise CheckpointError(f"{os.path.join(path, 'index.json')}: missing tensors {missing[:5]} {where}")
    if common.get("rng"):
        for r in range(int(common.get("world_size", 1))):
            rel = f"{io.RNG_DIR}/rank_{r:05d}.json"
            if rel not in index.aux_files:
                raise CheckpointError(f"{os.path.join(path, rel)}: missing from the checkpoint {where}")
    kind = "weights-only checkpoint (imported)" if common.get("weights_only") else "training checkpoint"
    return {
        "path": path, "kind": kind, "iteration": index.iteration, "model_tensors": len(model),
        "optimizer_tensors": len(optim), "world_size": common.get("world_size"), "files": len(index.files),
        "bytes": sum(f.bytes for f in index.files),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="verify_checkpoint.py", description="Check a checkpoint directory completely.")
    parser.add_argument("directory", help="save root (latest_checkpointed_iteration.txt), iter_N directory, or hf_io directory")
    args = parser.parse_args(argv)
    try:
        s = verify_checkpoint(args.directory)
    except CheckpointError as exc:
        print(f"checkpoint INVALID: {exc}", file=sys.stderr)
        return 1
    if s["iteration"] is None:
        print(f"checkpoint OK: {s['path']} ({s['kind']}, {s['model_tensors']} tensors)")
    else:
        print(
            f"checkpoint OK: {s['path']} ({s['kind']}, iteration {s['iteration']}, {s['model_tensors']} model tensors, "
            f"{s['optimizer_tensors']} optimizer tensors, {s['files']} data files, {s['bytes']:,} bytes, "
            f"saved by {s['world_size']} ranks)"
        )
    return 0
