#!/usr/bin/env python
"""fp32 CPU GEMM rates: torch's default BLAS (torch.mm) vs oneDNN (megatron.core.onednn.linear).

    python benchmarks/cpu_gemm.py                 # the proxy model's GEMM shapes, 2 threads
    python benchmarks/cpu_gemm.py --threads 1 --reps 20

For each shape T x in -> out (a linear layer on T tokens) the three GEMMs of a training step are
timed, best of `--reps`: forward x W^T, input gradient g W and weight gradient g^T x, the
gradients through autograd (F.linear's backward vs the oneDNN op's own). Then the memory oneDNN
keeps per distinct GEMM shape: it builds and caches a kernel for every new shape, so the script
runs `--shapes` row counts once each and reports the resident-memory growth per shape (the
reason the MoE experts, whose row counts change every step, stay on torch's grouped kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from megatron.core import onednn  # noqa: E402

# (tokens, in, out) of benchmarks/train_step.py's proxy: square, LM head, dense MLP, MLA latents
SHAPES: List[Tuple[int, int, int]] = [(2048, 2048, 2048), (1024, 512, 8192), (1024, 512, 2816), (1024, 2816, 512),
                                      (1024, 512, 512), (1024, 128, 1024), (1024, 512, 160)]


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores this process may use)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--shapes", type=int, default=100, help="distinct row counts for the kernel-cache memory check")
    a = p.parse_args(argv)
    if not onednn.available():
        print("torch was built without oneDNN: nothing to compare")
        return 1
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    print(f"{torch.get_num_threads()} threads; GFLOP/s torch.mm / oneDNN (ratio)")
    for t, i, o in SHAPES:
        x, w, g = torch.randn(t, i), torch.randn(o, i), torch.randn(t, o)
        flops = 2 * t * i * o
        rates = {}
        for lib, linear in (("blas", torch.nn.functional.linear), ("onednn", onednn.linear)):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y_x, y_w = linear(xr, w), linear(x, wr)  # graphs that differentiate x only / w only
            rates[lib] = [_best(lambda: linear(x, w), a.reps),
                          _best(lambda: torch.autograd.grad(y_x, xr, g, retain_graph=True), a.reps),
                          _best(lambda: torch.autograd.grad(y_w, wr, g, retain_graph=True), a.reps)]
        cells = [f"{name} {flops / tb / 1e9:5.0f} / {flops / td / 1e9:5.0f} ({tb / td:.2f}x)"
                 for name, tb, td in zip(("fwd", "grad_x", "grad_w"), rates["blas"], rates["onednn"])]
        print(f"{t:5d} x {i:5d} -> {o:5d}: " + "   ".join(cells))
    x, w = torch.randn(a.shapes + 100, 512), torch.randn(320, 512)
    onednn.linear(x, w)
    before = _rss_mib()
    for rows in range(100, 100 + a.shapes):
        onednn.linear(x[:rows], w)
    grown = _rss_mib() - before
    print(f"oneDNN kernel cache: {a.shapes} distinct row counts of a [rows, 512] x [512, 320] GEMM grew the "
          f"resident memory by {grown:.1f} MiB ({grown / a.shapes:.2f} MiB per shape)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
