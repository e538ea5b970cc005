"""Distributed training checkpoints (`torch_dist` format on torch.distributed.checkpoint).

Directory layout (Megatron's):

    {save}/latest_checkpointed_iteration.txt   "N", written last and atomically (temp + os.replace)
    {save}/iter_{N:07d}/
        .metadata, __{rank}_0.distcp           DCP: global shapes + each rank's chunks
        common.json                            format, iteration, consumed samples, scheduler state,
                                               optimizer header (step, param groups), run args
        rng/rank_{rank:05d}.json               python / numpy / torch CPU / device RNG per rank

A save is written to `iter_N.tmp-XXXXXXXX` and renamed by rank 0 after a barrier, then the
tracker is updated: a process killed mid-save leaves the previous checkpoint and tracker intact
(stale temp dirs are ignored on load and removed by the next save). Re-saving an existing
iteration moves the old directory aside first (`iter_N.tmp-old-XXXX`); a kill in that window
leaves it loadable and the next save moves it back.

Layout independence: every tensor is stored under our parameter name as the FULL logical tensor
("model/<name>", "optim/<name>/exp_avg|exp_avg_sq|master"). Each rank writes only its own chunk
(a DTensor over a rank mesh whose placements follow `sharding.shard_of`; the fused dense gate_up
[2F, H] is stored as [2, F, H] so its TP shard is a plain chunk); replicated copies (DP ranks,
the shared embedding of the first and last stage) are de-duplicated by DCP. Loading builds the
target layout's DTensors and DCP reads exactly the needed slices: any TP / PP / EP / DP layout
loads any other. Memory: no full tensor is ever materialised on a rank when saving or loading;
the distributed optimizer's DP shards are first joined into per-parameter (TP/EP-local) tensors
by a zero-padded all-reduce over dp / edp, i.e. transiently the optimizer state of the
non-distributed optimizer (one parameter at a time is reduced, but all are held until written).

Loading never unpickles arbitrary objects: metadata through an allow-listing unpickler, tensor
payloads as raw bytes, everything else JSON. `load_checkpoint` also accepts the single-process
format of `hf_io` (config.json + safetensors, no tracker) as a finetune start.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megatron.core.distributed.ddp import unwrap_model
from megatron.training import checkpoint_io as io
from megatron.training.checkpoint_io import CheckpointError

TRACKER_NAME = "latest_checkpointed_iteration.txt"

__all__ = [
    "save_checkpoint", "load_checkpoint", "checkpoint_args", "verify_checkpoint", "export_full_state_dict", "CheckpointError",
    "TRACKER_NAME", "iteration_dir",
]


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _chunks(model_chunks: Any) -> List[nn.Module]:
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    return [unwrap_model(c) for c in model_chunks]


def _shared_token() -> str:
    """A random suffix chosen by rank 0 and broadcast (same temp dir name on every rank)."""
    token = torch.tensor([secrets.randbits(31)], dtype=torch.int64)
    if _distributed():
        dist.broadcast(token, src=0)
    return f"{int(token.item()):08x}"


# ---- optimizer state as per-parameter local tensors ----------------------------------------------
def _local_optimizer_state(optimizer: Any, chunks: List[nn.Module], state: Any) -> Dict[str, Dict[str, torch.Tensor]]:
    """{param name: {exp_avg, exp_avg_sq[, master]}} shaped like this rank's (TP/EP-local) parameter.

    The distributed optimizer's "dp_shard" pieces are joined by an all-reduce of zero-padded
    tensors over dp (edp for experts): collective, every rank of those groups iterates the same
    parameters in the same order."""
    sd = optimizer.state_dict()
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    if sd["layout"] == "full":
        for chunk_params in sd["params"]:
            for name, entry in chunk_params.items():
                out.setdefault(name, {k: entry[k] for k in io.OPTIM_KEYS if k in entry})
        return out
    for index, module in enumerate(chunks):
        entries = sd["params"][index]
        for name, p in module.named_parameters():
            if not p.requires_grad or name in out:
                continue
            entry = entries.get(name)
            keys = ["exp_avg", "exp_avg_sq"] + (["master"] if p.dtype != torch.float32 else [])
            joined = {}
            for key in keys:
                flat = torch.zeros(p.numel(), dtype=torch.float32)
                if entry is not None and key in entry:
                    flat[entry["start"] : entry["end"]] = entry[key]
                group = state.group("edp" if getattr(p, "is_expert", False) else "dp")
                if _distributed() and group is not None:
                    dist.all_reduce(flat, group=group)
                joined[key] = flat.view(p.shape)
            out[name] = joined
    return out


# ---- save ------------------------------------------------------------------------------------------
_OLD_MARK = ".tmp-old-"  # iter_N.tmp-old-XXXX: a complete iter_N moved aside while iter_N is re-saved


def _clean_interrupted_saves(save_dir: str) -> None:
    """Rank 0, before a save: undo what a process killed mid-save left behind.

    iter_N.tmp-XXXX (a save that never finished) and stray tracker temp files are removed. An
    iter_N.tmp-old-XXXX is a complete checkpoint that was moved aside to re-save iteration N: if
    the kill came before the new iter_N was in place, it is moved back (the tracker may name it);
    otherwise it is a leftover and removed.
    """
    for entry in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, entry)
        if entry.startswith("iter_") and _OLD_MARK in entry:
            original = os.path.join(save_dir, entry.split(_OLD_MARK)[0])
            if not os.path.exists(original):
                os.replace(path, original)
                continue
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith("iter_") and ".tmp-" in entry:
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(TRACKER_NAME + ".") and entry.endswith(".tmp"):
            os.unlink(path)


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: Any,
    optimizer: Any,
    scheduler_state: Optional[dict],
    run_config: Any,
    parallel_state: Any,
    consumed_samples: Optional[dict],
    rng: bool = True,
) -> str:
    """Save a checkpoint of iteration `iteration` (collective over all ranks). Returns its directory."""
    rank, distributed = _rank(), _distributed()
    chunks = _chunks(model_chunks)
    final = iteration_dir(save_dir, iteration)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        _clean_interrupted_saves(save_dir)
    tmp = f"{final}.tmp-{_shared_token()}"
    if rank == 0:
        os.makedirs(os.path.join(tmp, io.RNG_DIR))
    _barrier()

    tensors: Dict[str, torch.Tensor] = {}
    for module in chunks:
        for name, t in io.persistent_named_tensors(module).items():
            tensors.setdefault(io.MODEL_PREFIX + name, io.to_storage(name, t, t.detach(), parallel_state, distributed))
    header: Optional[Dict[str, Any]] = None
    if optimizer is not None:
        params = {}
        for module in chunks:
            params.update(dict(module.named_parameters()))
        for name, entry in _local_optimizer_state(optimizer, chunks, parallel_state).items():
            for key, value in entry.items():
                tensors[f"{io.OPTIM_PREFIX}{name}/{key}"] = io.to_storage(name, params[name], value, parallel_state, distributed)
        full_header = optimizer.state_dict()
        header = {k: full_header[k] for k in ("format", "step", "param_groups")}
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not distributed)

    if rng:
        io.atomic_write_text(
            os.path.join(tmp, io.RNG_DIR, f"rank_{rank:05d}.json"), json.dumps(io.rng_state_json(io.optional_device()))
        )
    if rank == 0:
        args = None
        if run_config is not None:
            from megatron.training.config import to_flat_dict

            args = to_flat_dict(run_config)
        common = {
            "format": io.FORMAT,
            "iteration": int(iteration),
            "consumed_samples": consumed_samples or {},
            "scheduler_state": scheduler_state,
            "optimizer": header,
            "args": args,
            "world_size": dist.get_world_size() if distributed else 1,
            "rng": bool(rng),
        }
        try:
            text = json.dumps(common, indent=1)
        except TypeError as exc:
            raise TypeError(f"checkpoint metadata must be JSON (scheduler state, consumed samples, args): {exc}") from exc
        io.atomic_write_text(os.path.join(tmp, io.COMMON_NAME), text)
    _barrier()
    if rank == 0:
        old = None
        if os.path.exists(final):  # re-saving an iteration: keep the old one until the new is in place
            old = f"{final}{_OLD_MARK}{secrets.token_hex(4)}"
            os.replace(final, old)
        os.replace(tmp, final)
        io.atomic_write_text(os.path.join(save_dir, TRACKER_NAME), str(int(iteration)))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# ---- locating a checkpoint ----------------------------------------------------------------------------
def read_tracker(root: str) -> Optional[int]:
    """Iteration named by the tracker file, None when there is none; CheckpointError when corrupt."""
    path = os.path.join(root, TRACKER_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None


def _is_hf_io_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path))


def _resolve(load_dir: str) -> Optional[str]:
    """The iteration directory to load from `load_dir` (a save root or an iter_N dir)."""
    if os.path.isfile(os.path.join(load_dir, io.COMMON_NAME)):
        return load_dir
    iteration = read_tracker(load_dir)
    if iteration is None:
        return None
    path = iteration_dir(load_dir, iteration)
    if not os.path.isdir(path):
        # killed while re-saving iteration N, between moving the old iter_N aside and putting the
        # new one in place: the moved-aside copy is complete (the next save moves it back)
        moved = sorted(e for e in os.listdir(load_dir) if e.startswith(os.path.basename(path) + _OLD_MARK))
        if moved:
            return os.path.join(load_dir, moved[0])
        raise CheckpointError(f"{os.path.join(load_dir, TRACKER_NAME)} names iteration {iteration} but {path} does not exist")
    return path


def _dcp_load(state: Dict[str, Any], path: str) -> None:
    distributed = _distributed()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=io.SafeFileSystemReader(path), no_dist=not distributed)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: reading tensors failed: {exc}") from exc


def _check_keys(md: Any, wanted: Dict[str, torch.Tensor], path: str, what: str) -> None:
    have = md.state_dict_metadata
    missing = [k for k in wanted if k not in have]
    if missing:
        raise CheckpointError(f"{path}: {what} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _target(key: str, name: str, param: torch.Tensor, md: Any, state: Any) -> torch.Tensor:
    """An empty storage object for `key` in this rank's layout, with the stored dtype; checks shapes."""
    item = md.state_dict_metadata[key]
    kind, splits = io.placements_for(name, param, state)
    local = torch.empty(param.shape, dtype=item.properties.dtype)
    obj = io.to_storage(name, param, local, state, _distributed())
    from torch.distributed.tensor import DTensor

    global_shape = tuple(obj.shape) if isinstance(obj, DTensor) else tuple(obj.shape)
    if tuple(item.size) != global_shape:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(item.size)} != this model's full shape {global_shape}")
    return obj


def checkpoint_args(load_dir: Optional[str], run_config: Any = None) -> Optional[Dict[str, Any]]:
    """The run arguments (`to_flat_dict`) a checkpoint was saved with, for --use-checkpoint-args.

    torch_dist checkpoints: common.json's "args". The single-process hf_io format (e.g. written by
    `tools/convert_hf_checkpoint.py import`) stores only the model's DeepSeekConfig: it is returned
    as `run_config` with that model. None when `load_dir` holds no checkpoint or no arguments."""
    if not load_dir or not os.path.isdir(load_dir):
        return None
    path = _resolve(load_dir)
    if path is not None:
        return io.read_json(os.path.join(path, io.COMMON_NAME)).get("args")
    if _is_hf_io_dir(load_dir) and run_config is not None:
        import dataclasses

        from megatron.core.models.deepseek.hf_io import read_our_config
        from megatron.training.config import to_flat_dict

        return to_flat_dict(dataclasses.replace(run_config, model=read_our_config(load_dir)))
    return None


# ---- load ------------------------------------------------------------------------------------------------
def load_checkpoint(
    load_dir: Optional[str],
    model_chunks: Any,
    optimizer: Any,
    run_config: Any,
    parallel_state: Any,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
) -> Optional[dict]:
    """Load into any layout (collective). None when `load_dir` holds no checkpoint.

    Returns {"iteration", "consumed_samples", "scheduler_state", "args"}. `finetune` (and the
    hf_io format) load weights only: iteration 0, empty consumed samples, no scheduler state.
    `load_optim=False` skips optimizer and scheduler state (Megatron's --no-load-optim)."""
    if not load_dir or not os.path.isdir(load_dir):
        return None
    chunks = _chunks(model_chunks)
    path = _resolve(load_dir)
    if path is None:
        if _is_hf_io_dir(load_dir):
            io.load_hf_io(load_dir, chunks, parallel_state)
            _refresh_master(optimizer)
            return {"iteration": 0, "consumed_samples": {}, "scheduler_state": None, "args": None}
        return None
    common = io.read_json(os.path.join(path, io.COMMON_NAME))
    if common.get("format") != io.FORMAT:
        raise CheckpointError(f"{os.path.join(path, io.COMMON_NAME)}: unknown format {common.get('format')!r}")
    md = io.read_metadata(path)
    io.check_storage_files(path, md)

    targets: Dict[str, torch.Tensor] = {}
    owners: Dict[str, torch.Tensor] = {}
    params: Dict[str, torch.Tensor] = {}
    for module in chunks:
        for name, t in io.persistent_named_tensors(module).items():
            key = io.MODEL_PREFIX + name
            if key not in targets:
                params[name] = t
                if key in md.state_dict_metadata:
                    targets[key] = _target(key, name, t, md, parallel_state)
                else:
                    targets[key] = t  # reported by _check_keys
                owners[key] = t
    _check_keys(md, targets, path, "model state")
    use_optim = optimizer is not None and load_optim and not finetune
    optim_keys: Dict[str, tuple] = {}
    if use_optim:
        if common.get("optimizer") is None:
            raise CheckpointError(f"{path}: saved without optimizer state; load with --no-load-optim")
        for module in chunks:
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                for sub in io.OPTIM_KEYS:
                    key = f"{io.OPTIM_PREFIX}{name}/{sub}"
                    if key in targets:
                        continue
                    if key in md.state_dict_metadata:
                        targets[key] = _target(key, name, p, md, parallel_state)
                        optim_keys[key] = (name, sub, p)
                    elif sub != "master":
                        raise CheckpointError(f"{path}: optimizer state lacks {key!r}")
    _dcp_load(targets, path)

    with torch.no_grad():
        for key, owner in owners.items():
            owner.data.copy_(io.storage_local(targets[key], owner))
    if use_optim:
        _load_optimizer(optimizer, chunks, common["optimizer"], targets, optim_keys)
    else:
        _refresh_master(optimizer)
    if load_rng and not finetune:
        rng_path = os.path.join(path, io.RNG_DIR, f"rank_{_rank():05d}.json")
        if os.path.isfile(rng_path):
            io.restore_rng_state(io.read_json(rng_path), io.optional_device())
        elif common.get("rng", True):
            warnings.warn(f"{rng_path} missing (saved with another world size?): RNG state not restored")
    if finetune:
        return {"iteration": 0, "consumed_samples": {}, "scheduler_state": None, "args": common.get("args")}
    return {
        "iteration": int(common["iteration"]),
        "consumed_samples": common.get("consumed_samples") or {},
        "scheduler_state": common.get("scheduler_state") if load_optim else None,
        "args": common.get("args"),
    }


def _load_optimizer(optimizer: Any, chunks: List[nn.Module], header: dict, targets: dict, optim_keys: dict) -> None:
    """Give the optimizer a "full"-layout state dict built from the loaded per-parameter tensors."""
    per_name: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, (name, sub, p) in optim_keys.items():
        per_name.setdefault(name, {})[sub] = io.storage_local(targets[key], p).float()
    params_by_chunk = []
    for module in chunks:
        entries = {}
        for name, p in module.named_parameters():
            if name in per_name:
                entry = dict(per_name[name])
                if "master" not in entry and p.dtype != torch.float32:
                    entry["master"] = p.detach().float()
                elif "master" in entry and p.dtype == torch.float32:
                    entry.pop("master")
                entries[name] = entry
        params_by_chunk.append(entries)
    optimizer.load_state_dict(
        {"format": header["format"], "layout": "full", "step": header["step"], "param_groups": header["param_groups"], "params": params_by_chunk}
    )


def _refresh_master(optimizer: Any) -> None:
    """After loading weights only: fp32 master copies of low-precision parameters follow the weights."""
    if optimizer is None:
        return
    with torch.no_grad():
        for s in getattr(optimizer, "slots", []):
            if s.owns_master:
                s.master.copy_(s.param.detach().reshape(-1)[s.lo : s.hi])


# ---- verification and export -----------------------------------------------------------------------
def verify_checkpoint(directory: str) -> Dict[str, Any]:
    """Check a checkpoint (save root or iter dir) for completeness; CheckpointError on any problem.

    Checks: tracker parseable and naming an existing iteration dir; common.json readable, of this
    format and agreeing with the tracker; DCP metadata readable (safely); every data file present
    and long enough; every tensor's chunks covering its full shape; optimizer state complete for
    every stored parameter; one RNG file per saved rank. Returns a summary dict."""
    path = _resolve(directory)
    if path is None:
        raise CheckpointError(f"{directory}: no checkpoint (no {TRACKER_NAME} and no {io.COMMON_NAME})")
    common = io.read_json(os.path.join(path, io.COMMON_NAME))
    if common.get("format") != io.FORMAT:
        raise CheckpointError(f"{os.path.join(path, io.COMMON_NAME)}: unknown format {common.get('format')!r}")
    tracked = read_tracker(directory) if path != directory else None
    if tracked is not None and tracked != common.get("iteration"):
        raise CheckpointError(f"{os.path.join(directory, TRACKER_NAME)}: says {tracked}, {path} holds {common.get('iteration')}")
    md = io.read_metadata(path)
    io.check_storage_files(path, md)
    io.check_tiling(md)
    if common.get("optimizer") is not None:
        missing = io.expected_optim_keys(md)
        model_keys = [k for k in md.state_dict_metadata if k.startswith(io.MODEL_PREFIX)]
        if missing:
            raise CheckpointError(f"{path}: missing tensors {missing[:5]}")
        if not any(k.startswith(io.OPTIM_PREFIX) for k in md.state_dict_metadata) and model_keys:
            raise CheckpointError(f"{path}: optimizer header present but no optimizer tensors")
    if common.get("rng"):
        for r in range(int(common.get("world_size", 1))):
            io.read_json(os.path.join(path, io.RNG_DIR, f"rank_{r:05d}.json"))
    keys = md.state_dict_metadata
    return {
        "path": path,
        "iteration": common.get("iteration"),
        "model_tensors": sum(k.startswith(io.MODEL_PREFIX) for k in keys),
        "optimizer_tensors": sum(k.startswith(io.OPTIM_PREFIX) for k in keys),
        "world_size": common.get("world_size"),
    }


def export_full_state_dict(load_dir: str) -> Dict[str, torch.Tensor]:
    """Full tensors of every model tensor of a checkpoint of any layout, by our names (one process,
    no collectives; holds the whole model in memory)."""
    path = _resolve(load_dir)
    if path is None:
        raise CheckpointError(f"{load_dir}: no checkpoint")
    md = io.read_metadata(path)
    io.check_storage_files(path, md)
    state = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith(io.MODEL_PREFIX)
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=io.SafeFileSystemReader(path), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: reading tensors failed: {exc}") from exc
    out = {}
    for key, t in state.items():
        name = key[len(io.MODEL_PREFIX):]
        if name.endswith("gate_up_proj.weight") and t.dim() == 3:
            t = t.reshape(t.shape[0] * t.shape[1], t.shape[2])
        out[name] = t
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron.training.checkpointing")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a checkpoint directory for completeness")
    v.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        summary = verify_checkpoint(args.directory)
    except CheckpointError as exc:
        print(f"checkpoint INVALID: {exc}", file=sys.stderr)
        return 1
    print(
        f"checkpoint OK: {summary['path']} (iteration {summary['iteration']}, {summary['model_tensors']} model "
        f"tensors, {summary['optimizer_tensors']} optimizer tensors, saved by {summary['world_size']} ranks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


def load_full_model(load_dir: str):
    """A single-process DeepSeekModel holding a training checkpoint of any layout (for export).

    The model config comes from the arguments saved with the checkpoint; the vocabulary size from
    the stored embedding (the padded size the run trained with). Holds the whole model in memory.
    """
    import dataclasses

    from megatron.core.models.deepseek.model import DeepSeekModel
    from megatron.training.config import from_flat_dict

    args = checkpoint_args(load_dir)
    if not args:
        raise CheckpointError(f"{load_dir}: no saved run arguments; cannot rebuild the model config")
    state = export_full_state_dict(load_dir)
    config = from_flat_dict(args, strict=False).model
    config = dataclasses.replace(config, vocab_size=int(state["embedding.weight"].shape[0]))
    model = DeepSeekModel(config)
    model.load_state_dict(state, strict=True)
    return model, config
