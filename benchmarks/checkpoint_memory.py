#!/usr/bin/env python
"""Extra host memory of a distributed-optimizer checkpoint save and load, per rank, at DP 1, 2, 4.

    python benchmarks/checkpoint_memory.py [--params-m 24] [--dp 1 2 4] [--buffer-mib 4] [--block-mib 1]

Each data-parallel size runs as its own group of spawned gloo processes (one CPU rank each).
Every rank holds the same bf16 model (a stack of square linear layers, --params-m million
parameters) wrapped for the distributed optimizer, whose fp32 state (master weights, exp_avg,
exp_avg_sq: 12 bytes per parameter) is sharded over DP and filled with random values. Per rank:

    shard    bytes of this rank's optimizer state (its element ranges of every parameter)
    save     peak resident memory during `save_checkpoint` minus the resident memory before it
    load     the same for `load_checkpoint` into the same model and optimizer (zeroed first)

Peak resident memory is the kernel's VmHWM after resetting it (/proc/self/clear_refs), with freed
heap memory returned first (malloc_trim) so that reusing it counts; file pages in the page cache
are not resident memory of the process. The bound the checkpoint code keeps:
extra <= shard + B, where B = read/staging buffer (--buffer-mib) + one checksum block
(--block-mib) + the index and plan metadata; in fact the shard is never copied (written from and
read into the live state), so the measured extra stays near B while the shard falls as 1/DP.
For comparison, the DCP-based save this format replaced joined every parameter's DP shards into
zero-padded full fp32 tensors before writing: 12 bytes per local parameter on every rank,
whatever the DP size.
Prints one line per rank and a summary line per DP size.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
from typing import Dict, List

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

MIB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Return freed heap memory to the kernel (so that reusing it shows as growth), reset VmHWM to
    the current resident size; returns that size in bytes."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status("VmRSS")


def build(params_m: float, width: int = 2048) -> nn.Module:
    layers = max(1, round(params_m * 1e6 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    return model.to(torch.bfloat16)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        from megatron.core import communication as comm
        from megatron.core.distributed import DDPConfig, DistributedDataParallel
        from megatron.core.optimizer import OptimizerConfig, build_optimizer
        from megatron.core.parallel_state import ParallelConfig, ParallelState
        from megatron.training import checkpointing as ckpt

        state = ParallelState.build(ParallelConfig())
        torch.manual_seed(0)
        model = build(args.params_m)
        ddp = DistributedDataParallel(model, DDPConfig(use_distributed_optimizer=True, bucket_size_mb=32), state)
        opt = build_optimizer([ddp], OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True), state)
        pieces = opt.sharded_state()["pieces"]
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for piece in pieces:
                for t in piece.tensors.values():
                    t.copy_(torch.randn(t.shape, generator=g))
        shard = sum(t.numel() * t.element_size() for p in pieces for t in p.tensors.values())
        local_params = sum(p.numel() for p in model.parameters())
        buffer, block = int(args.buffer_mib * MIB), int(args.block_mib * MIB)

        comm.barrier(torch.device("cpu"))
        before = _reset_peak()
        ckpt.save_checkpoint(args.dir, 1, [ddp], opt, None, None, state, None, rng=False, buffer_bytes=buffer,
                             block_bytes=block)
        save_extra = _status("VmHWM") - before
        with torch.no_grad():
            for piece in opt.sharded_state()["pieces"]:
                for t in piece.tensors.values():
                    t.zero_()
            for p in model.parameters():
                p.zero_()
        comm.barrier(torch.device("cpu"))
        before = _reset_peak()
        ckpt.load_checkpoint(args.dir, [ddp], opt, None, state, load_rng=False, buffer_bytes=buffer)
        load_extra = _status("VmHWM") - before
        results[rank] = {"shard": shard, "save": save_extra, "load": load_extra, "old": 12 * local_params,
                         "bound": shard + buffer + block + 4 * MIB}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dp(dp: int, args: argparse.Namespace) -> List[Dict[str, int]]:
    """Per-rank figures for one data-parallel size."""
    with tempfile.TemporaryDirectory(prefix=f"ckpt_mem_dp{dp}_") as directory:
        ns = argparse.Namespace(**vars(args), dir=directory)
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_rank_main, args=(dp, _free_port(), ns, results), nprocs=dp, join=True)
            return [dict(results[r]) for r in range(dp)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-m", type=float, default=24.0, help="model size in millions of parameters (bf16)")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--buffer-mib", type=float, default=4.0, help="read / staging buffer of the checkpoint code")
    parser.add_argument("--block-mib", type=float, default=1.0, help="checksum block size")
    args = parser.parse_args(argv)
    print(f"model {args.params_m:g}M bf16 parameters; buffer {args.buffer_mib:g} MiB, checksum block {args.block_mib:g} MiB")
    for dp in args.dp:
        figures = run_dp(dp, args)
        for rank, f in enumerate(figures):
            print(f"DP={dp} rank {rank}: optimizer shard {f['shard'] / MIB:7.1f} MiB | save extra {f['save'] / MIB:6.1f} MiB | "
                  f"load extra {f['load'] / MIB:6.1f} MiB | bound {f['bound'] / MIB:7.1f} MiB | DCP-based save "
                  f"{f['old'] / MIB:7.1f} MiB")
        worst = max(max(f["save"], f["load"]) for f in figures)
        print(f"DP={dp} summary: shard {max(f['shard'] for f in figures) / MIB:.1f} MiB per rank, worst extra "
              f"{worst / MIB:.1f} MiB (save/load), bound {max(f['bound'] for f in figures) / MIB:.1f} MiB, "
              f"{'within' if all(max(f['save'], f['load']) <= f['bound'] for f in figures) else 'ABOVE'} the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
