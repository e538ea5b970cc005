#!/usr/bin/env python
"""MLA core attention with a value head narrower than q/k: which SDPA form is cheapest here.

    python benchmarks/mla_value_width.py                 # proxy dims and DeepSeek-V3 dims, CPU

For each shape, forward + backward of causal attention through the kv projection view
kv [b, h, s, nope + v] (what MLA hands attention), timed as best-of-N process CPU time:
- wide: the last d_qk columns of kv as v (a view; d_qk-wide softmax·V, extra columns dropped) so
  torch picks its flash kernel (what `attention.mla_value` does on CPU);
- narrow: the d_v-wide v as is (torch then runs its math path on CPU: the flash kernel wants one
  head size);
- padded: v zero-padded to d_qk (a copy) then flash (HF's way).
Outputs and gradients of the three agree (checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def variants(q: torch.Tensor, k: torch.Tensor, kv: torch.Tensor, nope: int) -> Dict[str, Callable[[], torch.Tensor]]:
    d_qk, d_v = q.shape[-1], kv.shape[-1] - nope
    lead = d_qk - d_v
    scale = d_qk ** -0.5

    def wide() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, kv[..., nope - lead :], is_causal=True, scale=scale)[..., lead:]

    def narrow() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, kv[..., nope:], is_causal=True, scale=scale)

    def padded() -> torch.Tensor:
        v = F.pad(kv[..., nope:], (0, lead))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :d_v]

    return {"wide": wide, "narrow": narrow, "padded": padded}


def measure(batch: int, heads: int, seq: int, nope: int, rope: int, v_dim: int, reps: int) -> Dict[str, float]:
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, nope + rope, requires_grad=True)
    k = torch.randn(batch, heads, seq, nope + rope, requires_grad=True)
    kv = torch.randn(batch, heads, seq, nope + v_dim, requires_grad=True)
    fns = variants(q, k, kv, nope)
    grad = torch.randn(batch, heads, seq, v_dim)
    ref_out = fns["narrow"]()
    ref_grads = torch.autograd.grad(ref_out, (q, k, kv), grad)
    for fn in fns.values():  # same attention, same gradients, whichever form
        out = fn()
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        for got, want in zip(torch.autograd.grad(out, (q, k, kv), grad), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.process_time()
            torch.autograd.grad(fn(), (q, k, kv), grad)
            best[name] = min(best[name], time.process_time() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; best of {a.reps}, fwd+bwd CPU ms")
    for shape in ((4, 8, 256, 64, 32, 64), (1, 16, 1024, 128, 64, 128)):
        best = measure(*shape, reps=a.reps)
        b, h, s, nope, rope, v = shape
        cells = "  ".join(f"{k} {1e3 * t:.1f}" for k, t in best.items())
        print(f"b{b} h{h} s{s} d_qk {nope + rope} d_v {v}: {cells}  narrow/wide {best['narrow'] / best['wide']:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
