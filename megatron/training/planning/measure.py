"""Measure what the planner predicts, on a real run of the training entry point.

Peak memory of each rank (resident set high-water mark of the child process):

    torchrun --nproc_per_node 2 --no-python python -m megatron.training.planning.measure rss -- \
        python pretrain_gpt.py <flags>

prints `PLAN_MEASURE rss rank=<RANK> max_rss_bytes=<n>` per rank. Run with
MALLOC_MMAP_THRESHOLD_=65536 so glibc serves every tensor-sized allocation with its own mapping
and returns it to the OS when freed: the high-water mark then follows the peak of live tensors
(plus the process baseline), as a device allocator's peak "allocated" statistic does.

Bytes moved per process-group kind:

    torchrun --nproc_per_node 2 -m megatron.training.planning.measure comm --out DIR -- pretrain_gpt.py <flags>

wraps torch.distributed's collectives and point-to-point calls, learns which group is which kind
from `ParallelState.build`, runs the script as `__main__`, and writes DIR/comm_rank<R>.json:
{"bytes": {kind: {op: bytes}}, "calls": {kind: {op: count}}}, counted as comm.py defines them.
Counting two runs that differ only in --train-iters and subtracting gives one step's traffic.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import resource
import runpy
import subprocess
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


class CommCounter:
    """Counts bytes per (group kind, op) of every torch.distributed call it wraps."""

    def __init__(self) -> None:
        self.kinds: Dict[int, str] = {}
        self.bytes: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def kind(self, group: Any) -> str:
        if group is None:
            return "world"
        return self.kinds.get(id(group), "other")

    def record(self, group: Any, op: str, nbytes: int) -> None:
        kind = self.kind(group)
        self.bytes[kind][op] += nbytes
        self.calls[kind][op] += 1

    def install(self) -> None:
        """Count every collective from now on: a counting backend for megatron.core.communication
        (the one module that calls torch.distributed), and ParallelState.build wrapped to learn
        which group is which kind."""
        import torch.distributed as dist

        from megatron.core import communication, parallel_state

        counter = self
        build = parallel_state.ParallelState.build.__func__

        def wrapped_build(cls, *args, **kwargs):
            state = build(cls, *args, **kwargs)
            for kind, group in state.groups.items():
                if group is not None:
                    counter.kinds[id(group)] = kind
            return state

        parallel_state.ParallelState.build = classmethod(wrapped_build)
        communication.set_backend(_CountingBackend(counter, dist))

    def as_dict(self) -> Dict[str, Any]:
        return {"bytes": {k: dict(v) for k, v in self.bytes.items()}, "calls": {k: dict(v) for k, v in self.calls.items()}}


class _CountingBackend:
    """torch.distributed's API, recording the bytes of every collective before running it."""

    # op name -> (counted as, bytes of the call's tensors)
    _SIZES = {
        "all_reduce": ("all_reduce", lambda t, *a, **k: _nbytes(t)),
        "all_gather": ("all_gather", lambda out, t, *a, **k: sum(_nbytes(x) for x in out)),
        "all_gather_into_tensor": ("all_gather", lambda out, t, *a, **k: _nbytes(out)),
        "all_gather_single": ("all_gather", lambda out, t, *a, **k: _nbytes(out)),
        "reduce_scatter_tensor": ("reduce_scatter", lambda out, t, *a, **k: _nbytes(t)),
        "reduce_scatter_single": ("reduce_scatter", lambda out, t, *a, **k: _nbytes(t)),
        "all_to_all_single": ("all_to_all", lambda out, t, *a, **k: _nbytes(t)),
        "broadcast": ("broadcast", lambda t, *a, **k: _nbytes(t)),
    }

    def __init__(self, counter: CommCounter, dist: Any) -> None:
        self.counter, self.dist = counter, dist

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.dist, name)
        if name == "batch_isend_irecv":
            def batch(ops):
                for p2p in ops:
                    op = "send" if p2p.op is self.dist.isend else "recv"
                    self.counter.record(p2p.group, op, _nbytes(p2p.tensor))
                return real(ops)

            return batch
        if name not in self._SIZES:
            return real
        op, size = self._SIZES[name]

        @functools.wraps(real)
        def inner(*args, **kwargs):
            self.counter.record(kwargs.get("group"), op, size(*args, **kwargs))
            return real(*args, **kwargs)

        return inner


def _rss(cmd: List[str]) -> int:
    proc = subprocess.run(cmd)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    rank = os.environ.get("RANK", "0")
    # One write for the whole line: the ranks share the pipe, and an unbuffered print writes the
    # text and its newline separately, so two ranks' lines could run together.
    sys.stdout.write(f"PLAN_MEASURE rss rank={rank} max_rss_bytes={peak_kib * 1024} returncode={proc.returncode}\n")
    sys.stdout.flush()
    return proc.returncode


def _comm(out_dir: str, cmd: List[str]) -> int:
    counter = CommCounter()
    counter.install()
    rank = os.environ.get("RANK", "0")

    def dump() -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"comm_rank{rank}.json"), "w") as f:
            json.dump(counter.as_dict(), f)

    atexit.register(dump)
    script = cmd[0]
    sys.argv = list(cmd)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


# ---- drivers: run the entry point under torchrun and collect the measurements -----------------
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(world: int, tail: List[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + tail


def measure_peak_rss(world: int, train_argv: Sequence[str], timeout: float = 900, attempts: int = 3) -> List[int]:
    """Peak resident bytes of each rank of `torchrun pretrain_gpt.py <train_argv>` (rank order).

    glibc's mmap threshold is pinned (see the module docstring) and each rank uses one thread.
    A failed run is started again, up to `attempts` runs (on a heavily loaded machine a rank
    occasionally aborts while its threads shut down, after training finished).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    for attempt in range(attempts):
        cmd = _torchrun(world, ["--no-python", sys.executable, "-m", "megatron.training.planning.measure", "rss",
                                "--", sys.executable, os.path.join(REPO_ROOT, "pretrain_gpt.py"), *train_argv])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
        peaks: Dict[int, int] = {}
        for line in proc.stdout.splitlines():
            if line.startswith("PLAN_MEASURE rss"):
                fields = dict(item.split("=", 1) for item in line.split()[2:])
                if fields["returncode"] == "0":
                    peaks[int(fields["rank"])] = int(fields["max_rss_bytes"])
        if proc.returncode == 0 and len(peaks) == world:
            return [peaks[r] for r in range(world)]
    raise RuntimeError(f"measurement run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def count_comm(
    world: int, train_argv: Sequence[str], out_dir: str, timeout: float = 600, attempts: int = 3
) -> List[Dict[str, Any]]:
    """Per-rank {"bytes", "calls"} of `torchrun pretrain_gpt.py <train_argv>` (whole run; a failed
    run is started again, up to `attempts` runs, as in `measure_peak_rss`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    for attempt in range(attempts):
        cmd = _torchrun(world, ["-m", "megatron.training.planning.measure", "comm", "--out", out_dir, "--",
                                os.path.join(REPO_ROOT, "pretrain_gpt.py"), *train_argv])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
        if proc.returncode == 0:
            break
    else:
        raise RuntimeError(f"counting run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"comm_rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def one_step_comm(world: int, train_argv: Sequence[str], work_dir: str) -> List[Dict[str, Dict[str, float]]]:
    """Bytes of one training step per rank and group kind: a 2-iteration run minus a 1-iteration run."""
    runs = []
    for iters in (1, 2):
        argv = [a for a in train_argv] + ["--train-iters", str(iters)]
        runs.append(count_comm(world, argv, os.path.join(work_dir, f"iters{iters}")))
    step = []
    for one, two in zip(*runs):
        diff: Dict[str, Dict[str, float]] = {}
        for kind, ops in two["bytes"].items():
            for op, value in ops.items():
                delta = value - one["bytes"].get(kind, {}).get(op, 0.0)
                if delta:
                    diff.setdefault(kind, {})[op] = delta
        step.append(diff)
    return step


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron.training.planning.measure")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("rss", help="run a command, report its peak resident memory")
    comm = sub.add_parser("comm", help="run a Python script in-process, count its torch.distributed traffic")
    comm.add_argument("--out", required=True)
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--" not in raw:
        parser.error("put the command after --")
    split = raw.index("--")
    args = parser.parse_args(raw[:split])
    cmd = raw[split + 1:]
    if not cmd:
        parser.error("no command after --")
    return _rss(cmd) if args.what == "rss" else _comm(args.out, cmd)


if __name__ == "__main__":
    sys.exit(main())
