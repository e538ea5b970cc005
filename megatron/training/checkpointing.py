"""Distributed training checkpoints (`--ckpt-format torch_dist`): the save / load protocol.

Directory layout (Megatron's):

    {save}/latest_checkpointed_iteration.txt   "N", written last and atomically; never moves
                                               backwards unless asked (allow_tracker_rewind)
    {save}/save.lock                           the job saving here (`checkpoint_lock`)
    {save}/iter_{N:07d}/
        rank_{r:05d}.bin, index.json           tensor data and its JSON index (`checkpoint_format`)
        common.json                            format, iteration, consumed samples, scheduler state,
                                               optimizer header (step, param groups), run args
        rng/rank_{r:05d}.json                  python / numpy / torch CPU / device RNG per rank
        saver.json                             the process that wrote it

Save (collective): rank 0 checks the lock and the tracker, cleans up leftovers of interrupted
saves it may touch, and creates `iter_N.tmp-XXXX`. Every rank lists what it can write: each model
tensor as a box of the global tensor (`sharding.placement_of`), each optimizer piece as a flat
element range of it (`optimizer.sharded_state()`). Rank 0 picks one writer per element
(`checkpoint_boxes.assign_writers`: replicated tensors are written once, spread over the
replicas); each rank writes its share straight from its live tensors into its own data file;
rank 0 writes common.json and index.json, renames the directory into place (moving an older
copy of the same iteration aside first) and writes the tracker. A process killed at any point
leaves the previous checkpoint and tracker intact, or a moved-aside copy that loading and the
next save use.

Load (collective): every rank reads the index and, for each tensor it holds, intersects its
boxes (clipped to `logical_rows` for padded vocabularies) with the stored ones, reading straight
into its parameters and its optimizer's live state through one bounded buffer. So any layout
(TP, SP, PP, EP, DP, distributed optimizer) loads any other, and no rank holds more than its own
tensors plus that buffer (and the index). Errors are agreed on by all ranks, so they all raise the
same CheckpointError. `fallback_to_previous` (flag --ckpt-fallback-to-previous) tries
older complete iterations when the tracked one fails.

`load_checkpoint` also accepts the single-process hf_io format (config.json + safetensors) as a
weights-only start. Verification lives in `checkpoint_verify`, export in `checkpoint_export`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core.distributed.ddp import unwrap_model
from megatron.core.models.deepseek.sharding import ShardInfo
from megatron.training import checkpoint_io as io
from megatron.training import checkpoint_lock as lock
from megatron.training import checkpoint_shards as shards
from megatron.training.checkpoint_boxes import disjoint_cover
from megatron.training.checkpoint_format import (
    DEFAULT_BLOCK_BYTES, DEFAULT_BUFFER_BYTES, FORMAT, CheckpointReader, Index, read_common, read_index, sha256_text,
    write_index,
)
from megatron.training.checkpoint_io import TRACKER_NAME, CheckpointError, iteration_dir, read_tracker

__all__ = [
    "save_checkpoint", "load_checkpoint", "checkpoint_args", "verify_checkpoint", "export_full_state_dict",
    "load_full_model", "CheckpointError", "TRACKER_NAME", "iteration_dir", "read_tracker", "acquire_save_lock",
    "release_save_lock", "verify_saved_checkpoint",
]

acquire_save_lock = lock.acquire_save_lock
release_save_lock = lock.release_save_lock


# ---- collectives: metadata only, through megatron.core.communication (see checkpoint_io) --------------
def _rank() -> int:
    return io.rank()


def _world() -> int:
    return io.world()


def _broadcast(obj: Any) -> Any:
    return io.from_rank0(obj)


def _gather(obj: Any) -> List[Any]:
    return io.all_gather_object(obj)


def _scatter(objs: Optional[List[Any]]) -> Any:
    """This rank's item of rank 0's list."""
    return io.from_rank0(objs)[_rank()]


def _agree(error: Optional[str]) -> None:
    """Every rank raises the first rank's error (so none waits alone in a later collective)."""
    first = next((e for e in io.all_gather_object(error) if e), None)
    if first:
        raise CheckpointError(first)


def _chunks(model_chunks: Any) -> List[nn.Module]:
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    return [unwrap_model(c) for c in model_chunks]


def _info(parallel_state: Any) -> ShardInfo:
    return ShardInfo.from_parallel_state(parallel_state) if parallel_state is not None else ShardInfo()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save --------------------------------------------------------------------------------------------
def _clean_interrupted_saves(save_dir: str, held: Optional[lock.SaveLock]) -> None:
    """Rank 0, before a save: undo what a process killed mid-save left behind, where allowed.

    iter_N.tmp-XXXX (a save that never finished) is removed. An iter_N.tmp-old-XXXX is a complete
    checkpoint moved aside to re-save iteration N: if the new iter_N never arrived it is moved
    back (the tracker may name it), else removed. Leftovers of a possibly running save of another
    process are left alone (`checkpoint_lock.may_remove_leftover`)."""
    for entry in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, entry)
        if entry.startswith("iter_") and io.TMP_MARK in entry and os.path.isdir(path):
            if not lock.may_remove_leftover(path, held):
                warnings.warn(f"{path}: unfinished save of another running process; left in place")
                continue
            if io.OLD_MARK in entry:
                original = os.path.join(save_dir, entry.split(io.OLD_MARK)[0])
                if not os.path.exists(original):
                    os.replace(path, original)
                    continue
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(TRACKER_NAME + ".") and entry.endswith(".tmp"):
            if held is not None or time.time() - os.path.getmtime(path) > 86400:
                os.unlink(path)


def _preflight(save_dir: str, iteration: int, allow_tracker_rewind: bool) -> Tuple[str, str]:
    """Rank 0: checks, cleanup, and the temp directory of this save: (temp dir, token)."""
    os.makedirs(save_dir, exist_ok=True)
    held = lock.check_writable(save_dir)
    try:
        tracked = read_tracker(save_dir)
    except CheckpointError:
        if not allow_tracker_rewind:
            raise
        tracked = None
    if tracked is not None and iteration < tracked and not allow_tracker_rewind:
        raise CheckpointError(
            f"{os.path.join(save_dir, TRACKER_NAME)}: says iteration {tracked}; saving iteration {iteration} would move "
            "it backwards. Save into another directory, or allow it (allow_tracker_rewind, --ckpt-allow-tracker-rewind)"
        )
    _clean_interrupted_saves(save_dir, held)
    token = secrets.token_hex(4)
    tmp = f"{iteration_dir(save_dir, iteration)}{io.TMP_MARK}{token}"
    os.makedirs(os.path.join(tmp, io.RNG_DIR))
    lock.write_owner(tmp, held)
    return tmp, token


def _common(iteration: int, header: Optional[dict], scheduler_state: Any, run_config: Any, consumed: Any, rng: bool,
            extra: Optional[Dict[str, Any]]) -> str:
    args = None
    if run_config is not None:
        from megatron.training.config import to_flat_dict

        args = to_flat_dict(run_config)
    common = {
        "format": FORMAT, "iteration": int(iteration), "consumed_samples": consumed or {},
        "scheduler_state": scheduler_state, "optimizer": header, "args": args, "args_scope": "run",
        "world_size": _world(), "rng": bool(rng), "weights_only": False,
    }
    common.update(extra or {})
    try:
        return json.dumps(common, indent=1)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata must be JSON (scheduler state, consumed samples, args): {exc}") from exc


def _finish(tmp: str, iteration: int, tensors: Dict[str, Tuple], results: List[Dict], common_text: str,
            block_bytes: int) -> None:
    """Rank 0: common.json and index.json into the temp dir (after every rank's data)."""
    files, table = [], {k: {"dtype": v[0], "shape": list(v[1]), "trainable": v[2], "boxes": []} for k, v in tensors.items()}
    aux = {io.COMMON_NAME: sha256_text(common_text)}
    for result in results:
        aux.update(result["rng"])
        if result["file"] is None:
            continue
        files.append(result["file"])
        for key, position, off, size in result["boxes"]:
            table[key]["boxes"].append([len(files) - 1, position, off, size])
    for key, entry in table.items():
        problem = disjoint_cover(tuple(entry["shape"]), [(tuple(b[2]), tuple(b[3])) for b in entry["boxes"]])
        if problem:
            raise CheckpointError(f"{tmp}: tensor {key!r} is not stored exactly once: {problem}")
    io.atomic_write_text(os.path.join(tmp, io.COMMON_NAME), common_text)
    body = {"format": FORMAT, "iteration": int(iteration), "block_bytes": block_bytes, "files": files,
            "aux_files": aux, "tensors": table}
    write_index(tmp, body, io.atomic_write_text)
    _fsync_dir(tmp)


def _commit(save_dir: str, tmp: str, iteration: int, token: str) -> str:
    """Rank 0: put the finished save in place and point the tracker at it."""
    final = iteration_dir(save_dir, iteration)
    old = None
    if os.path.exists(final):  # re-saving an iteration: keep the old one until the new is in place
        old = f"{final}{io.OLD_MARK}{token}"
        lock.write_owner(final, lock.held_lock(save_dir))  # the moved-aside copy is this save's to clean
        os.replace(final, old)
    os.replace(tmp, final)
    io.atomic_write_text(os.path.join(save_dir, TRACKER_NAME), str(int(iteration)))
    _fsync_dir(save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save(save_dir: str, iteration: int, chunks: List[nn.Module], optimizer: Any, scheduler_state: Any, run_config: Any,
          parallel_state: Any, consumed: Any, rng: bool, allow_tracker_rewind: bool, buffer_bytes: int, block_bytes: int,
          extra: Optional[Dict[str, Any]] = None) -> str:
    rank = _rank()
    pre: Any = None
    if rank == 0:
        try:
            pre = ("ok",) + _preflight(save_dir, iteration, allow_tracker_rewind)
        except Exception as exc:  # every rank waits for this answer
            pre = ("error", str(exc) if isinstance(exc, (CheckpointError, OSError)) else f"{save_dir}: {type(exc).__name__}: {exc}")
    pre = _broadcast(pre)
    if pre[0] == "error":
        raise CheckpointError(pre[1])
    tmp, token = pre[1], pre[2]

    items: List[shards.Item] = []
    offers: List[Tuple] = []
    meta: Dict[Any, Any] = {}
    problem = None
    try:
        items, offers, meta = shards.holdings(chunks, optimizer, _info(parallel_state))
    except Exception as exc:  # reported through the plan below: every rank must reach the gather
        problem = f"{tmp}: rank {rank}: {type(exc).__name__}: {exc}"
    gathered = _gather((offers, meta, problem))
    plans: Optional[List[Any]] = None
    tensors: Dict[str, Tuple] = {}
    if rank == 0:
        try:
            problems = [g[2] for g in gathered if g[2]]  # type: ignore[union-attr]
            if problems:
                raise ValueError(problems[0])
            tensors, assignment = shards.plan([g[0] for g in gathered], [g[1] for g in gathered])  # type: ignore[union-attr]
            plans = [("ok", assignment.get(r, [])) for r in range(_world())]
        except ValueError as exc:
            plans = [("error", str(exc) if str(exc).startswith(tmp) else f"{tmp}: {exc}")] * _world()
    plan = _scatter(plans)
    if plan[0] == "error":
        raise CheckpointError(plan[1])

    result: Dict[str, Any] = {"error": None, "rng": {}}
    try:
        result.update(shards.write_share(tmp, rank, items, plan[1], block_bytes, buffer_bytes))
        if rng:
            rel = f"{io.RNG_DIR}/rank_{rank:05d}.json"
            text = json.dumps(io.rng_state_json(io.optional_device()))
            io.atomic_write_text(os.path.join(tmp, rel), text)
            result["rng"] = {rel: sha256_text(text)}
    except Exception as exc:  # reported by rank 0 to all: every rank must reach the gather
        result["error"] = f"{tmp}: rank {rank} could not write its data: {type(exc).__name__}: {exc}"
    results = _gather(result)
    status: Optional[str] = None
    if rank == 0:
        try:
            errors = [r["error"] for r in results if r["error"]]  # type: ignore[union-attr]
            if errors:
                raise CheckpointError(errors[0])
            common = _common(iteration, meta.get(None), scheduler_state, run_config, consumed, rng, extra)
            _finish(tmp, iteration, tensors, results, common, block_bytes)  # type: ignore[arg-type]
            _commit(save_dir, tmp, iteration, token)
        except Exception as exc:  # every rank waits for this answer
            status = str(exc) if isinstance(exc, (CheckpointError, OSError)) else f"{tmp}: {type(exc).__name__}: {exc}"
    status = _broadcast(status)
    if status:
        raise CheckpointError(status)
    return iteration_dir(save_dir, iteration)


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
    *,
    allow_tracker_rewind: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> str:
    """Save iteration `iteration` (collective over all ranks); returns its directory.

    `optimizer` None saves weights only. `allow_tracker_rewind` (flag
    --ckpt-allow-tracker-rewind) allows an iteration below the tracker's. `buffer_bytes` bounds
    the host staging buffer for device tensors; `block_bytes` is the checksum block size."""
    return _save(save_dir, iteration, _chunks(model_chunks), optimizer, scheduler_state, run_config, parallel_state,
                 consumed_samples, rng, allow_tracker_rewind, buffer_bytes, block_bytes)


# ---- load ---------------------------------------------------------------------------------------------
def _restore_rng(path: str, index: Index, common: Dict[str, Any]) -> None:
    rel = f"{io.RNG_DIR}/rank_{_rank():05d}.json"
    where = os.path.join(path, rel)
    if not os.path.isfile(where):
        if common.get("rng", True):
            warnings.warn(f"{where} missing (saved with another world size?): RNG state not restored")
        return
    text = io.read_text(where)
    if rel in index.aux_files and index.aux_files[rel] != sha256_text(text):
        raise CheckpointError(f"{where}: checksum mismatch {index.where()}: the file is corrupt")
    try:
        io.restore_rng_state(io.parse_json_object(text, where), io.optional_device())
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: not a valid RNG state {index.where()}: {exc}") from None


def _load_from(path: str, chunks: List[nn.Module], optimizer: Any, parallel_state: Any, load_optim: bool,
               load_rng: bool, finetune: bool, buffer_bytes: int) -> Dict[str, Any]:
    error: Optional[str] = None
    out: Dict[str, Any] = {}
    try:
        index = read_index(path)
        common = read_common(path, index)
        weights_only = finetune or bool(common.get("weights_only"))
        use_optim = optimizer is not None and load_optim and not weights_only
        if use_optim and common.get("optimizer") is None:
            raise CheckpointError(f"{path}: saved without optimizer state; load with --no-load-optim or --finetune")
        info = _info(parallel_state)
        with CheckpointReader(index, buffer_bytes) as reader:
            shards.load_model_tensors(reader, chunks, info)
            if use_optim:
                try:
                    optimizer.load_sharded_state(common["optimizer"], shards.optimizer_fill(reader, info))
                except ValueError as exc:
                    raise CheckpointError(f"{path}: optimizer state: {exc} {index.where()}") from None
            elif optimizer is not None:
                optimizer.refresh_master_weights()
        if load_rng and not weights_only:
            _restore_rng(path, index, common)
        if weights_only:
            out = {"iteration": 0, "consumed_samples": {}, "scheduler_state": None}
        else:
            out = {"iteration": int(common["iteration"]), "consumed_samples": common.get("consumed_samples") or {},
                   "scheduler_state": common.get("scheduler_state") if load_optim else None}
        out.update(args=common.get("args") if common.get("args_scope", "run") == "run" else None, path=path)
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # any failure must reach every rank, or the others wait in a collective
        error = f"{path}: loading failed: {type(exc).__name__}: {exc}"
    _agree(error)
    return out


def _candidates(load_dir: str, fallback: bool) -> List[str]:
    """Iteration dirs to try, in order: the tracked one, then (with `fallback`) older complete ones."""
    if io.is_iteration_dir(load_dir):
        return [load_dir]
    try:
        first = io.resolve(load_dir)
    except CheckpointError:
        if not fallback:
            raise
        first = None
    if not fallback:
        return [first] if first else []
    limit = read_tracker_or_none(load_dir)
    older = [p for it, p in io.complete_iterations(load_dir) if limit is None or it < limit]
    return ([first] if first else []) + [p for p in older if p != first]


def read_tracker_or_none(root: str) -> Optional[int]:
    try:
        return read_tracker(root)
    except CheckpointError:
        return None


def load_checkpoint(
    load_dir: Optional[str],
    model_chunks: Any,
    optimizer: Any,
    run_config: Any,
    parallel_state: Any,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
    *,
    fallback_to_previous: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Optional[dict]:
    """Load into any layout (collective). None when `load_dir` holds no checkpoint.

    Returns {"iteration", "consumed_samples", "scheduler_state", "args", "path"}. `finetune`, and
    checkpoints of weights only (`convert_hf_checkpoint.py import`, the hf_io format), load
    weights only: iteration 0, empty consumed samples, no scheduler state. `load_optim=False`
    skips optimizer and scheduler state (--no-load-optim). `fallback_to_previous`: when the
    tracked iteration fails to load (missing or corrupt files), try older complete ones, newest
    first, with a warning; without it the error is raised."""
    if not load_dir or not os.path.isdir(load_dir):
        return None
    chunks = _chunks(model_chunks)
    candidates = _candidates(load_dir, fallback_to_previous)
    if not candidates:
        if io.is_hf_io_dir(load_dir):
            io.load_hf_io(load_dir, chunks, parallel_state)
            if optimizer is not None:
                optimizer.refresh_master_weights()
            return {"iteration": 0, "consumed_samples": {}, "scheduler_state": None, "args": None, "path": load_dir}
        return None
    failures = []
    for path in candidates:
        try:
            return _load_from(path, chunks, optimizer, parallel_state, load_optim, load_rng, finetune, buffer_bytes)
        except CheckpointError as exc:
            if not fallback_to_previous:
                raise
            failures.append(str(exc))
            warnings.warn(f"checkpoint {path} did not load ({exc}); falling back to the previous one")
    raise CheckpointError(f"{load_dir}: no checkpoint loads: " + " | ".join(failures))


def checkpoint_args(load_dir: Optional[str], run_config: Any = None) -> Optional[Dict[str, Any]]:
    """The run arguments (`to_flat_dict`) a checkpoint was saved with, for --use-checkpoint-args.

    Checkpoints of weights only (`convert_hf_checkpoint.py import`) store the model section
    alone: merged over `run_config`'s arguments (or returned alone without it). The hf_io format
    stores the DeepSeekConfig: returned as `run_config` with that model. None when there is
    no checkpoint or no arguments."""
    if not load_dir or not os.path.isdir(load_dir):
        return None
    path = io.resolve(load_dir)
    if path is not None:
        common = read_common(path)
        args = common.get("args")
        if args is not None and common.get("args_scope", "run") == "model" and run_config is not None:
            from megatron.training.config import to_flat_dict

            return {**to_flat_dict(run_config), **args}
        return args
    if io.is_hf_io_dir(load_dir) and run_config is not None:
        import dataclasses

        from megatron.core.models.deepseek.hf_io import read_our_config
        from megatron.training.config import to_flat_dict

        return to_flat_dict(dataclasses.replace(run_config, model=read_our_config(load_dir)))
    return None


# ---- re-exports and the old command line ----------------------------------------------------------------
def verify_checkpoint(directory: str) -> Dict[str, Any]:
    """See `checkpoint_verify.verify_checkpoint`."""
    from megatron.training.checkpoint_verify import verify_checkpoint as verify

    return verify(directory)


def verify_saved_checkpoint(directory: str) -> Dict[str, Any]:
    """--verify-checkpoint after a save (collective): rank 0 checks `directory` completely (every
    block re-hashed); every rank returns its summary or raises the same CheckpointError."""
    result: Any = None
    if _rank() == 0:
        try:
            result = ("ok", verify_checkpoint(directory))
        except CheckpointError as exc:
            result = ("error", str(exc))
    result = _broadcast(result)
    if result[0] == "error":
        raise CheckpointError(result[1])
    return result[1]


def export_full_state_dict(load_dir: str) -> Dict[str, torch.Tensor]:
    """See `checkpoint_export.export_full_state_dict`."""
    from megatron.training.checkpoint_export import export_full_state_dict as export

    return export(load_dir)


def load_full_model(load_dir: str, dtype: Optional[torch.dtype] = None, device: Any = "cpu") -> Tuple[nn.Module, Any]:
    """See `checkpoint_export.load_full_model`."""
    from megatron.training.checkpoint_export import load_full_model as load

    return load(load_dir, dtype=dtype, device=device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m megatron.training.checkpointing verify DIR` (the tool is tools/verify_checkpoint.py)."""
    parser = argparse.ArgumentParser(prog="python -m megatron.training.checkpointing")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check a checkpoint directory").add_argument("directory")
    args = parser.parse_args(argv)
    from megatron.training.checkpoint_verify import main as verify_main

    return verify_main([args.directory])


if __name__ == "__main__":
    sys.exit(main())
