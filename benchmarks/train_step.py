#!/usr/bin/env python
"""Training-step throughput and peak memory: our DeepSeekModel vs HF transformers, same weights.

    python benchmarks/train_step.py                      # fp32 CPU, the 37M-parameter proxy
    python benchmarks/train_step.py --iters 10 --profile --json out.json
    python benchmarks/train_step.py --no-compile         # eager only

Five variants run in one process on the same weights and batch: HF eager, ours eager, HF compiled
(`torch.compile(model)` with the device's backend), ours compiled (`compile_model`: one region
per decoder layer / MTP depth / loss head) and `ours_blas`: ours eager with
`--use-onednn-linear false`, i.e. fp32 CPU GEMMs through torch's default BLAS like HF's, which
separates what the GEMM library brings from what the model code brings. Compiled variants
compile during warmup.

One process builds a random HF DeepseekV3ForCausalLM from the flags' config, saves it, and loads
it back twice: with transformers and through our converter (load_hf_checkpoint), so both run the
SAME weights. After warmup, timed forward+backward steps alternate between the variants (so drifts
in machine load hit all alike); each step is loss -> backward -> grads set to None (no optimizer: the
comparison is the model). The losses of the first step are printed to show the work is the same.

Peak memory: each variant runs in its own subprocess, which first runs one step (compiled variants
compile there, kernels JIT their code, libraries fill their caches: outside the measured window,
every variant alike). On CPU, the kernel's peak-RSS
counter (VmHWM) is then reset through /proc/self/clear_refs and 2 steps run; the figure is VmHWM
minus the RSS before them, i.e. activations + gradients + temporaries of a step. The child runs
with MALLOC_MMAP_THRESHOLD_=65536 so every tensor of 64 KiB or more is its own mapping, returned
on free: RSS follows the live tensors. On CUDA/HPU the
device allocator's max_allocated (after a reset) minus allocated before the step.

FLOPs per token (fwd; training = 3 x fwd, backward being two matmuls per forward one), counting a
multiply-add as 2 FLOPs, n heads, d_qk = nope + rope, s = sequence length:
    attention projections  2 * (H*q_lora + q_lora*n*d_qk   [or H*n*d_qk without q LoRA]
                                + H*(kv_lora + rope) + kv_lora*n*(nope + v) + n*v*H)
    attention core (causal) 2 * n * (d_qk + v) * (s + 1) / 2      (average keys per query)
    dense MLP               2 * 3 * H * ffn
    MoE MLP                 2 * 3 * H * moe_ffn * (topk + n_shared) + 2 * H * E (router)
    output head             2 * H * V
summed over layers (+ MTP depths: 2 * 2H * H + one MoE layer + head each). Only active experts
count. Achieved FLOP/s = FLOPs per token * tokens/s; the peak is a timed large fp32/bf16 matmul, the
faster of torch.mm and (CPU fp32) oneDNN's GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from megatron.core.config import DeepSeekConfig, KernelConfig, MLAConfig, MoEConfig, RopeConfig  # noqa: E402
from megatron.training.flops import flops_per_token  # noqa: E402  (one FLOP count for logs and benchmarks)


VARIANTS = ("hf", "ours", "hf_compiled", "ours_compiled", "ours_blas")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "hpu"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores this process may use)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed steps per model (alternating)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--first-dense", type=int, default=1)
    p.add_argument("--ffn", type=int, default=1408, help="dense MLP width")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--moe-ffn", type=int, default=160)
    p.add_argument("--shared-experts", type=int, default=1)
    p.add_argument("--groups", type=int, default=4, help="n_group (sigmoid group-limited routing)")
    p.add_argument("--topk-groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--q-lora", type=int, default=256, help="0: plain q_proj")
    p.add_argument("--kv-lora", type=int, default=128)
    p.add_argument("--nope", type=int, default=64)
    p.add_argument("--rope", type=int, default=32)
    p.add_argument("--v-dim", type=int, default=64)
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (ours uses torch SDPA on CPU/CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model memory subprocesses")
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one step of each model")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_memory_child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--_dir", help=argparse.SUPPRESS)
    return p


def build_config(a: argparse.Namespace) -> DeepSeekConfig:
    return DeepSeekConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_layers=a.layers, first_k_dense=a.first_dense,
        max_position_embeddings=max(4096, a.seq),
        mla=MLAConfig(num_heads=a.heads, q_lora_rank=a.q_lora or None, kv_lora_rank=a.kv_lora, qk_nope_head_dim=a.nope,
                      qk_rope_head_dim=a.rope, v_head_dim=a.v_dim),
        moe=MoEConfig(num_experts=a.experts, topk=a.topk, ffn_hidden_size=a.moe_ffn, num_shared_experts=a.shared_experts,
                      score_function="sigmoid", num_groups=a.groups, group_topk=a.topk_groups, norm_topk_prob=True,
                      routed_scaling_factor=2.5, enable_expert_bias=True),
        rope=RopeConfig(),
    )


def matmul_peak(device: torch.device, dtype: torch.dtype, sync: Callable[[], None], n: int = 2048, reps: int = 8) -> float:
    """Best FLOP/s of an n x n x n matmul, through torch.mm and, where it applies, oneDNN."""
    from megatron.core.tensor_parallel import dense_linear

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    # dense_linear is the model's GEMM: oneDNN where it applies, else the same torch.mm again
    gemms = [torch.mm, lambda x, y: dense_linear(x, y.t())]
    best = float("inf")
    for gemm in gemms:
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            gemm(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def load_models(which: List[str], path: str, dtype: torch.dtype, device: torch.device, attn: str) -> Dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from megatron.core.models.deepseek.hf_conversion import load_hf_checkpoint

    from megatron.core.device import get_device
    from megatron.core.models.deepseek import compile_model

    models = {}
    for kind in which:
        if kind.startswith("hf"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device).train()
            if kind.endswith("_compiled"):
                model = torch.compile(model, backend=get_device(device.type).compile_backend())
        else:
            overrides = {"kernels": KernelConfig(use_onednn_linear=False)} if kind == "ours_blas" else {}
            model = load_hf_checkpoint(path, dtype, device, **overrides)[0].train()
            if kind.endswith("_compiled"):
                model = compile_model(model)
        models[kind] = model
    return models


def make_step(kind: str, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """One forward + backward; returns the loss. Both models compute mean CE over all b*s targets."""
    mask = torch.ones_like(labels, dtype=torch.float32)

    def step() -> float:
        if kind.startswith("hf"):
            loss = model(inputs, labels=inputs, shift_labels=labels).loss
        else:
            loss = model.loss(model(inputs, labels=labels), mask)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return step


def _cpu_pressure() -> Optional[float]:
    """Linux PSI 'some avg60' of CPU: % of time runnable tasks waited for a core (None if unknown)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(a: argparse.Namespace, device: torch.device, dtype: torch.dtype, dev) -> None:
    import gc

    model = load_models([a._memory_child], a._dir, dtype, device, a.hf_attn)[a._memory_child]
    inputs, labels = make_batch(a, model.config.vocab_size, device)
    step = make_step(a._memory_child, model, inputs, labels)
    # One step outside the measured window, for every variant alike: compilation, kernel JIT
    # code and library caches are one-off costs, not a step's.
    step()
    gc.collect()
    if device.type == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = rss_bytes("VmRSS")
        for _ in range(2):
            step()
        out = {"base": base, "peak": rss_bytes("VmHWM"), "method": "VmHWM - VmRSS (clear_refs)"}
    else:
        dev.synchronize()
        dev.reset_peak_memory_stats()
        base = dev.memory_stats()["allocated"]
        for _ in range(2):
            step()
        dev.synchronize()
        out = {"base": base, "peak": dev.memory_stats()["max_allocated"], "method": "device max_allocated"}
    out["step_peak"] = out["peak"] - out["base"]
    print("MEMORY " + json.dumps(out))


def measure_memory(a: argparse.Namespace, kind: str, path: str) -> Optional[Dict]:
    argv = [sys.executable, os.path.abspath(__file__)] + [x for x in sys.argv[1:] if x != "--profile"]
    argv += ["--_memory_child", kind, "--_dir", path]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # RSS follows the live tensors (module doc)
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    print(f"memory subprocess for {kind} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
    return None


def make_batch(a: argparse.Namespace, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def profile_step(kind: str, step: Callable[[], float], rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return f"--- {kind}: top ops by self CPU time ---\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from megatron.core.device import get_device

    dev = get_device(a.device)
    device, dtype = dev.torch_device(), getattr(torch, a.dtype)
    if a._memory_child:
        memory_child(a, device, dtype, dev)
        return 0

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megatron.core.models.deepseek.hf_config import config_to_hf_dict

    load_start = os.getloadavg()[0]
    config = build_config(a)
    tmp = tempfile.TemporaryDirectory(prefix="train_step_bench_")
    torch.manual_seed(a.seed)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in config_to_hf_dict(config, "deepseek_v3").items() if k != "architectures"})
    init = DeepseekV3ForCausalLM(hf_cfg)
    params = sum(p.numel() for p in init.parameters())
    init.save_pretrained(tmp.name)
    del init
    variants = ["hf", "ours", "ours_blas"] if a.no_compile else list(VARIANTS)
    models = load_models(variants, tmp.name, dtype, device, a.hf_attn)
    inputs, labels = make_batch(a, config.vocab_size, device)
    steps = {k: make_step(k, m, inputs, labels) for k, m in models.items()}

    peak_before = matmul_peak(device, dtype, dev.synchronize)
    first, compile_s = {}, {}
    for k, s in steps.items():  # first warmup step (compiles), also the same-work check
        t = time.perf_counter()
        first[k] = float(s())
        compile_s[k] = time.perf_counter() - t
    for _ in range(a.warmup - 1):
        for s in steps.values():
            s()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    cpu_times: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(a.iters):
        for kind in variants:
            dev.synchronize()
            t, c = time.perf_counter(), time.process_time()
            steps[kind]()
            dev.synchronize()
            times[kind].append(time.perf_counter() - t)
            cpu_times[kind].append(time.process_time() - c)

    tokens = a.batch * a.seq
    flops = flops_per_token(config, a.seq)
    peak = max(peak_before, matmul_peak(device, dtype, dev.synchronize))  # best of both: contention only lowers it
    res: Dict = {
        "device": a.device, "dtype": a.dtype, "threads": threads, "batch": a.batch, "seq": a.seq, "iters": a.iters,
        "params": params, "train_flops_per_token": flops["train"], "flops_parts_fwd": flops,
        "matmul_peak_flops": peak, "first_loss": first, "first_step_s": compile_s, "load_avg_start": load_start,
    }
    for kind in variants:
        med = statistics.median(times[kind])
        res[kind] = {"median_s": med, "min_s": min(times[kind]), "tokens_per_s": tokens / med,
                     "best_tokens_per_s": tokens / min(times[kind]), "median_cpu_s": statistics.median(cpu_times[kind]),
                     "achieved_flops": flops["train"] * tokens / med, "fraction_of_peak": flops["train"] * tokens / med / peak}
    res["speedup_ours_over_hf"] = res["ours"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["speedup_best_of"] = res["hf"]["min_s"] / res["ours"]["min_s"]
    if not a.no_compile:
        res["speedup_ours_compiled_over_hf"] = res["ours_compiled"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
        res["speedup_ours_compiled_over_hf_compiled"] = (
            res["ours_compiled"]["tokens_per_s"] / res["hf_compiled"]["tokens_per_s"])
        res["speedup_hf_compiled_over_hf"] = res["hf_compiled"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["speedup_ours_blas_over_hf"] = res["ours_blas"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["cpu_pressure"] = _cpu_pressure()
    res["load_avg_end"] = os.getloadavg()[0]
    del models, steps
    if not a.no_memory:
        for kind in variants:
            res[kind]["memory"] = measure_memory(a, kind, tmp.name)

    print(f"config: {params / 1e6:.1f}M params, hidden {a.hidden}, {a.layers} layers (first {a.first_dense} dense), "
          f"{a.experts} experts top-{a.topk}, batch {a.batch} x {a.seq}, {a.dtype} on {a.device}, {threads} threads")
    print("first-step loss  " + "  ".join(f"{k} {v:.6f}" for k, v in first.items()))
    print("first step (incl. compile) s  " + "  ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; train FLOPs/token {flops['train'] / 1e6:.1f} M")
    for kind in variants:
        r = res[kind]
        mem = r.get("memory")
        mem_s = f", step peak memory {mem['step_peak'] / 2**20:.0f} MiB" if mem else ""
        print(f"{kind:13s} {r['tokens_per_s']:8.0f} tokens/s (median {r['median_s'] * 1e3:.0f} ms/step, best "
              f"{r['min_s'] * 1e3:.0f}, CPU {r['median_cpu_s'] * 1e3:.0f} ms), {r['achieved_flops'] / 1e9:.1f} GFLOP/s = "
              f"{100 * r['fraction_of_peak']:.0f}% of peak{mem_s}")
    print(f"ours / hf tokens/s: {res['speedup_ours_over_hf']:.2f}x (median), {res['speedup_best_of']:.2f}x (best step)")
    if not a.no_compile:
        print(f"ours compiled / hf eager {res['speedup_ours_compiled_over_hf']:.2f}x, "
              f"ours compiled / hf compiled {res['speedup_ours_compiled_over_hf_compiled']:.2f}x, "
              f"hf compiled / hf eager {res['speedup_hf_compiled_over_hf']:.2f}x (medians)")
    print(f"ours with torch's default BLAS (--use-onednn-linear false) / hf eager {res['speedup_ours_blas_over_hf']:.2f}x")
    print(f"load average {load_start:.2f} at start, {res['load_avg_end']:.2f} at end")
    if res["cpu_pressure"] is not None and res["cpu_pressure"] > 5.0:
        print(f"WARNING: CPU pressure {res['cpu_pressure']:.0f}% (other processes compete for cores): timings are unreliable")
    if a.profile:
        models = load_models(variants, tmp.name, dtype, device, a.hf_attn)
        for kind, model in models.items():
            step = make_step(kind, model, inputs, labels)
            step()
            print(profile_step(kind, step))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
