#!/usr/bin/env python
"""One command that says whether this code is right and fast on a device (CUDA GPU, Gaudi, or CPU).

    python benchmarks/device_check.py                 # the device found: hpu, else cuda, else cpu
    python benchmarks/device_check.py --device cuda --json device_check.json
    python benchmarks/device_check.py --quick         # reduced sizes (the CPU run CI makes)

Five parts, one table at the end (and JSON with --json):
  (a) device tests: `pytest -m device tests`, the tests written to run on the device under check
      (MEGATRON_TEST_DEVICE tells them which);
  (b) numerics: a tiny DeepSeek-V3 (MLA, MoE with expert bias, MTP) forward + backward in bf16 on
      the device against fp32 on the CPU, same weights: loss relative error and the worst cosine
      similarity of a parameter's gradient (bf16 tolerances: 2e-2 and 0.99; 0.95 for router
      weights, whose gradient follows the discrete top-k choices that bf16 rounding can flip);
  (c) training steps of a DeepSeek-V3-shaped proxy in bf16 (fp32 on CPU) whose micro-batch is
      doubled until the step's peak memory passes --memory-fraction of the device (or the
      largest that fits): tokens/s, TFLOP/s, MFU against a matmul peak measured on the spot,
      peak memory (optimizer step included: AdamW of this repository);
  (d) Hugging Face transformers' DeepseekV3ForCausalLM on the same config, weights, batch and
      device as the peer (forward + backward + torch AdamW): the same figures and the ratio;
  (e) eager vs torch.compile of our model, where `megatron.core.models.deepseek.compile_model` exists.
FLOPs per token are the training package's count (megatron/training/flops.py; 3 x forward).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig, RopeConfig  # noqa: E402
from megatron.core.device import Device, get_device  # noqa: E402
from megatron.training.flops import flops_per_token  # noqa: E402

# bf16 against fp32. Router weights get their gradient through the chosen experts only, and bf16
# rounding flips near-tied top-k choices, so their gradients agree less (checked separately).
GRAD_COSINE_MIN, ROUTER_GRAD_COSINE_MIN, LOSS_REL_MAX = 0.99, 0.95, 2e-2


def tiny_v3() -> DeepSeekConfig:
    return DeepSeekConfig(
        vocab_size=256, hidden_size=128, ffn_hidden_size=256, num_layers=3, first_k_dense=1, max_position_embeddings=256,
        mla=MLAConfig(num_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(num_experts=8, topk=2, ffn_hidden_size=64, num_shared_experts=1, num_groups=4, group_topk=2,
                      routed_scaling_factor=2.5, enable_expert_bias=True),
        mtp=MTPConfig(num_layers=1), rope=RopeConfig(),
    )


def proxy_v3(kind: str, quick: bool) -> Tuple[DeepSeekConfig, int]:
    """(config, sequence length) of the throughput proxy: DeepSeek-V3's shape ratios, scaled down."""
    if quick or kind == "cpu":
        hidden, layers, heads, experts, moe_ffn, vocab, seq = (256, 3, 4, 16, 128, 4096, 128) if quick else (512, 4, 8, 32, 160, 8192, 256)
    else:
        hidden, layers, heads, experts, moe_ffn, vocab, seq = 2048, 8, 16, 64, 1408, 32768, 4096
    config = DeepSeekConfig(
        vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=int(hidden * 2.75) // 64 * 64, num_layers=layers,
        first_k_dense=1, max_position_embeddings=max(4096, seq),
        mla=MLAConfig(num_heads=heads, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=128 if hidden >= 1024 else 64,
                      qk_rope_head_dim=64 if hidden >= 1024 else 32, v_head_dim=128 if hidden >= 1024 else 64),
        moe=MoEConfig(num_experts=experts, topk=6 if experts >= 32 else 2, ffn_hidden_size=moe_ffn, num_shared_experts=1,
                      num_groups=8 if experts >= 32 else 4, group_topk=4 if experts >= 32 else 2,
                      routed_scaling_factor=2.5, enable_expert_bias=True),
        rope=RopeConfig(),
    )
    return config, seq


# ---- (a) device tests ------------------------------------------------------------------------------------
def run_device_tests(kind: str, timeout_s: int) -> Dict[str, Any]:
    env = dict(os.environ, MEGATRON_TEST_DEVICE=kind)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", os.path.join(_REPO_ROOT, "tests")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    tail = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"ok": proc.returncode == 0, "summary": tail[-1] if tail else proc.stdout[-300:], "seconds": time.perf_counter() - start}


# ---- (b) numerics ------------------------------------------------------------------------------------------
def numerics(dev: Device) -> Dict[str, Any]:
    """bf16 on the device vs fp32 on the CPU, same weights and batch."""
    from megatron.core.models.deepseek.model import DeepSeekModel

    config = tiny_v3()
    reference = DeepSeekModel(config, seed=11)
    device_model = DeepSeekModel(config, seed=11).to(device=dev.torch_device(0), dtype=torch.bfloat16)
    tokens = torch.randint(0, config.vocab_size, (8, 129), generator=torch.Generator().manual_seed(5))
    results = {}
    for name, model in (("fp32_cpu", reference), ("bf16_device", device_model)):
        device = next(model.parameters()).device
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        loss = model.loss(model(x, labels=y), torch.ones(y.shape, device=device))
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None})
    (ref_loss, ref_grads), (dev_loss, dev_grads) = results["fp32_cpu"], results["bf16_device"]
    cosines = {n: torch.nn.functional.cosine_similarity(ref_grads[n].flatten(), dev_grads[n].flatten(), dim=0).item()
               for n in ref_grads if ref_grads[n].norm() > 0}
    routers = {n: c for n, c in cosines.items() if n.endswith("router.weight")}
    others = {n: c for n, c in cosines.items() if n not in routers}
    worst = min(others, key=others.get)
    worst_router = min(routers, key=routers.get) if routers else None
    rel = abs(dev_loss - ref_loss) / abs(ref_loss)
    ok = rel <= LOSS_REL_MAX and others[worst] >= GRAD_COSINE_MIN and all(c >= ROUTER_GRAD_COSINE_MIN for c in routers.values())
    return {"ok": ok, "loss_fp32_cpu": ref_loss, "loss_bf16_device": dev_loss, "loss_rel_err": rel,
            "worst_grad_cosine": others[worst], "worst_grad": worst,
            "worst_router_grad_cosine": routers.get(worst_router), "worst_router_grad": worst_router}


# ---- (c)-(e) throughput ---------------------------------------------------------------------------------------
def matmul_peak(dev: Device, dtype: torch.dtype, n: int) -> float:
    device = dev.torch_device(0)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        dev.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        dev.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _hf_and_ours(config: DeepSeekConfig, dtype: torch.dtype, device: torch.device, which: List[str]) -> Dict[str, torch.nn.Module]:
    """The same random weights as our model and as transformers' DeepseekV3ForCausalLM."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megatron.core.models.deepseek import config_to_hf_dict, load_hf_checkpoint

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf = DeepseekV3ForCausalLM(DeepseekV3Config(**config_to_hf_dict(config)))
        hf.save_pretrained(tmp)
        if "ours" in which:
            out["ours"] = load_hf_checkpoint(tmp, dtype, device)[0].train()
        if "hf" in which:
            out["hf"] = hf.to(device=device, dtype=dtype).train()
    return out


def _step_fn(kind: str, model: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    x, y = batch[:, :-1], batch[:, 1:]
    mask = torch.ones(y.shape, device=batch.device)
    if kind == "hf":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            model(x, labels=x, shift_labels=y).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    from megatron.core.optimizer import OptimizerConfig, build_optimizer
    from megatron.core.parallel_state import ParallelConfig, ParallelState

    opt = build_optimizer([model], OptimizerConfig(lr=1e-5, bf16=dtype == torch.bfloat16), ParallelState.build(ParallelConfig()))

    def ours() -> None:
        model.loss(model(x, labels=y), mask).backward()
        opt.step()
        opt.zero_grad()

    return ours


def _measure(dev: Device, step: Callable[[], None], tokens: int, iters: int) -> Dict[str, float]:
    step()
    dev.synchronize()
    dev.reset_peak_memory_stats()
    base = dev.memory_stats().get("allocated", 0)
    times = []
    for _ in range(iters):
        dev.synchronize()
        t = time.perf_counter()
        step()
        dev.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    stats = dev.memory_stats()
    return {"tokens_per_s": tokens / median, "median_step_s": median,
            "peak_memory_bytes": stats.get("max_allocated", 0) - base if stats else None}


def throughput(dev: Device, quick: bool, memory_fraction: float, iters: int) -> Dict[str, Any]:
    kind = dev.kind
    dtype = torch.float32 if kind == "cpu" else torch.bfloat16
    config, seq = proxy_v3(kind, quick)
    config = dataclasses.replace(config, params_dtype="float32" if dtype == torch.float32 else "bfloat16")
    device = dev.torch_device(0)
    peak = matmul_peak(dev, dtype, 1024 if kind == "cpu" else 8192)
    fpt = flops_per_token(config, seq)["train"]
    total = dev.total_memory()
    models = _hf_and_ours(config, dtype, device, ["ours", "hf"])
    out: Dict[str, Any] = {"config": {"hidden": config.hidden_size, "layers": config.num_layers, "experts": config.moe.num_experts,
                                      "seq": seq, "dtype": str(dtype).replace("torch.", "")},
                           "matmul_peak_tflops": peak / 1e12}
    batch_size = 1
    while True:  # grow the micro-batch until the step fills the requested share of the device
        batch = torch.randint(0, config.vocab_size, (batch_size, seq + 1), device=device)
        try:
            figures = {k: _measure(dev, _step_fn(k, m, batch, dtype), batch_size * seq, iters) for k, m in models.items()}
        except RuntimeError as exc:  # out of memory: keep the last size that fitted
            if "out of memory" not in str(exc).lower() or "ours" not in out:
                raise
            break
        out.update(batch=batch_size, **figures)
        used = figures["ours"]["peak_memory_bytes"]
        if kind == "cpu" or not total or not used or used >= memory_fraction * total or batch_size >= 64:
            break
        batch_size *= 2
    for k in ("ours", "hf"):
        out[k]["tflops"] = fpt * out[k]["tokens_per_s"] / 1e12
        out[k]["mfu"] = out[k]["tflops"] * 1e12 / peak
    out["ratio_ours_over_hf"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["compiled"] = _compiled(dev, models["ours"], config, seq, out["batch"], dtype, iters)
    return out


def _compiled(dev: Device, model: torch.nn.Module, config: DeepSeekConfig, seq: int, batch_size: int,
              dtype: torch.dtype, iters: int) -> Optional[Dict[str, float]]:
    try:
        from megatron.core.models.deepseek import compile_model
    except ImportError:
        return None
    batch = torch.randint(0, config.vocab_size, (batch_size, seq + 1), device=dev.torch_device(0))
    compiled = compile_model(model)
    return _measure(dev, _step_fn("ours", compiled, batch, dtype), batch_size * seq, iters)


# ---- report ----------------------------------------------------------------------------------------------------
def table(report: Dict[str, Any]) -> str:
    rows = [("device", f"{report['device']} ({report['device_name']})")]
    t = report.get("tests")
    if t:
        rows.append(("(a) device tests", f"{'OK' if t['ok'] else 'FAILED'}: {t['summary']}"))
    n = report["numerics"]
    rows.append(("(b) bf16 device vs fp32 cpu", f"{'OK' if n['ok'] else 'FAILED'}: loss rel err {n['loss_rel_err']:.2e}, "
                 f"worst grad cosine {n['worst_grad_cosine']:.5f} ({n['worst_grad']}), "
                 f"worst router {n['worst_router_grad_cosine']:.4f}"))
    p = report["throughput"]
    rows.append(("matmul peak", f"{p['matmul_peak_tflops']:.2f} TFLOP/s ({p['config']['dtype']})"))
    for name, label in (("ours", "(c) ours"), ("hf", "(d) HF DeepseekV3")):
        f = p[name]
        mem = f"{f['peak_memory_bytes'] / 2**30:.2f} GiB" if f.get("peak_memory_bytes") else "n/a (CPU)"
        rows.append((label, f"{f['tokens_per_s']:.0f} tokens/s, {f['tflops']:.3f} TFLOP/s, MFU {100 * f['mfu']:.1f}%, peak memory {mem}"))
    rows.append(("ours / HF", f"{p['ratio_ours_over_hf']:.2f}x (micro-batch {p['batch']} x seq {p['config']['seq']})"))
    c = p.get("compiled")
    rows.append(("(e) ours compiled", "not available" if c is None else
                 f"{c['tokens_per_s']:.0f} tokens/s ({c['tokens_per_s'] / p['ours']['tokens_per_s']:.2f}x eager)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "hpu", "cpu"))
    p.add_argument("--quick", action="store_true", help="reduced sizes (CPU smoke, as in CI)")
    p.add_argument("--skip-tests", action="store_true", help="skip part (a)")
    p.add_argument("--memory-fraction", type=float, default=0.6, help="grow the proxy's micro-batch up to this share of memory")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", help="write the report to this file")
    a = p.parse_args(argv)
    dev = get_device(a.device)
    report: Dict[str, Any] = {"device": dev.kind, "device_name": dev.device_name(), "quick": a.quick,
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    if not a.skip_tests:
        report["tests"] = run_device_tests(dev.kind, timeout_s=300)
    report["numerics"] = numerics(dev)
    report["throughput"] = throughput(dev, a.quick, a.memory_fraction, a.iters)
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    ok = report["numerics"]["ok"] and report.get("tests", {"ok": True})["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
