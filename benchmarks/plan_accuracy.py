#!/usr/bin/env python
"""How close the layout planner's peak-memory prediction is to a real CPU run, per rank.

    python benchmarks/plan_accuracy.py [--layouts tp2_sp,ep2_alltoall] [--json out.json]
    python benchmarks/plan_accuracy.py --comm

For every layout, `torchrun pretrain_gpt.py` runs two iterations twice: with the benchmark model
and with a tiny model of the same layout. The measure is each rank's resident-set high-water
mark (megatron.training.planning.measure: MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave
the process). The tiny run gives the process baseline (Python, torch, gloo, data loader, code
pages): baseline = measured_tiny - predicted_tiny. The compared quantity is
measured_big - baseline against the planner's peak for the rank's stage (fp32, device type cpu).
--comm instead counts the bytes torch.distributed moves per group kind in one training step
(a 2-iteration run minus a 1-iteration run, tiny model) and compares them with the plan, summed
over both ranks. Results are copied to benchmarks/RESULTS.md from the printed tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.training.arguments import parse_args  # noqa: E402
from megatron.training.planning import measure  # noqa: E402
from megatron.training.planning.plan import plan_for_run  # noqa: E402

# 4 layers (1 dense + 3 MoE of 8 experts, top-2, one shared) + 1 MTP depth, hidden 512; ~39M parameters.
MODEL = [
    "--model-preset", "tiny", "--hidden-size", "512", "--num-attention-heads", "8", "--q-lora-rank", "128",
    "--kv-lora-rank", "64", "--qk-head-dim", "64", "--qk-pos-emb-head-dim", "32", "--v-head-dim", "64",
    "--ffn-hidden-size", "2048", "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "512",
    "--moe-shared-expert-intermediate-size", "512", "--num-layers", "4", "--vocab-size", "4095",
    "--seq-length", "1024", "--micro-batch-size", "2",
]
# Same structure and sequence, tiny widths: what the process costs without a model worth
# measuring. The sequence length stays: the mock dataset's index arrays (a set-up transient) scale
# with the number of samples per epoch, i.e. with 1 / seq-length.
TINY = [
    "--hidden-size", "64", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "16",
    "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32",
    "--moe-shared-expert-intermediate-size", "32", "--vocab-size", "255",
]
RUN = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--lr", "1e-4", "--train-iters", "2", "--device", "cpu",
    "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0", "--seed", "1",
]

LAYOUTS: Dict[str, Tuple[int, List[str]]] = {
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--global-batch-size", "4"]),
    "pp2_uneven_1_3": (2, ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                           "--global-batch-size", "8"]),
    "ep2_alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                         "--global-batch-size", "4"]),
    "ep2_allgather": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather",
                          "--global-batch-size", "4"]),
    "dp2_distopt": (2, ["--use-distributed-optimizer", "--global-batch-size", "4"]),
    "ep2_distopt_full_recompute": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                                       "--use-distributed-optimizer", "--recompute-granularity", "full",
                                       "--recompute-method", "uniform", "--recompute-num-layers", "1",
                                       "--global-batch-size", "4"]),
    "tp2_sp_selective_recompute": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                       "--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe",
                                       "--global-batch-size", "4"]),
    "tp2_sp_ep2_distopt": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                               "--use-distributed-optimizer", "--global-batch-size", "4"]),
}


# Communication: a tiny model (traffic does not depend on the widths being realistic).
COMM_MODEL = ["--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size",
              "32", "--num-layers", "3", "--seq-length", "32", "--micro-batch-size", "2", "--vocab-size", "255"]
COMM_LAYOUTS: Dict[str, List[str]] = {
    "tp2_sp_ep2_allgather": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size",
                             "2", "--moe-token-dispatcher-type", "allgather", "--global-batch-size", "4"],
    "pp2_uneven_mtp": ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                       "--global-batch-size", "8"],
    "dp2_ep2_alltoall_distopt": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                                 "--use-distributed-optimizer", "--global-batch-size", "8"],
    "tp2_sp_full_recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity",
                              "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
                              "--global-batch-size", "4"],
    "tp2_sp_ep2_allgather_full_recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                            "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                            "allgather", "--recompute-granularity", "full", "--recompute-method",
                                            "uniform", "--recompute-num-layers", "2", "--global-batch-size", "4"],
    "ep2_allgather_moe_recompute_distopt": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                            "allgather", "--recompute-granularity", "selective",
                                            "--recompute-modules", "moe", "--use-distributed-optimizer",
                                            "--global-batch-size", "8"],
    "tp2_sp_ep2_alltoall_moe_recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                          "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                                          "--recompute-granularity", "selective", "--recompute-modules", "moe",
                                          "--global-batch-size", "4"],
}


def compare_comm(name: str, work_dir: str) -> List[Tuple[str, str, float, float]]:
    """(kind, op, predicted, counted) per step, summed over the ranks."""
    argv = COMM_MODEL + RUN + COMM_LAYOUTS[name] + ["--log-interval", "1000"]  # no logging iteration
    run = parse_args(argv, 2, check_paths=False)
    plan = plan_for_run(run, "cpu")
    per_stage = 2 // plan.layout.pp
    counted = measure.one_step_comm(2, argv, os.path.join(work_dir, name))
    totals: Dict[Tuple[str, str], List[float]] = {}
    for rank in range(2):
        for kind, ops in plan.stages[rank // per_stage].comm_bytes.items():
            for op, value in ops.items():
                totals.setdefault((kind, op), [0.0, 0.0])[0] += value
        for kind, ops in counted[rank].items():
            for op, value in ops.items():
                totals.setdefault((kind, op), [0.0, 0.0])[1] += value
    return [(kind, op, p, c) for (kind, op), (p, c) in sorted(totals.items())]


def predicted_peaks(world: int, argv: Sequence[str]) -> List[float]:
    """The planner's peak bytes for every rank (its pipeline stage's peak)."""
    run = parse_args(list(argv), world, check_paths=False)
    plan = plan_for_run(run, "cpu")
    per_stage = world // plan.layout.pp
    return [plan.stages[rank // per_stage].memory.peak for rank in range(world)]


def compare(name: str, world: int, flags: Sequence[str]) -> Dict[str, object]:
    big = MODEL + RUN + list(flags)
    tiny = MODEL + RUN + list(flags) + TINY
    t0 = time.time()
    measured_big = measure.measure_peak_rss(world, big)
    measured_tiny = measure.measure_peak_rss(world, tiny)
    pred_big, pred_tiny = predicted_peaks(world, big), predicted_peaks(world, tiny)
    ranks = []
    for r in range(world):
        baseline = measured_tiny[r] - pred_tiny[r]
        delta = measured_big[r] - baseline
        ranks.append({"rank": r, "predicted": pred_big[r], "measured": delta, "baseline": baseline,
                      "error": (pred_big[r] - delta) / delta})
    return {"layout": name, "world": world, "flags": list(flags), "ranks": ranks, "seconds": time.time() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--comm", action="store_true", help="check communication bytes instead of memory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.comm:
        return main_comm([n for n in args.layouts.split(",") if n in COMM_LAYOUTS])
    results = []
    print("| layout | rank | predicted MiB | measured MiB (RSS peak - baseline) | baseline MiB | error |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.layouts.split(","):
        world, flags = LAYOUTS[name]
        res = compare(name, world, flags)
        results.append(res)
        for r in res["ranks"]:
            print(f"| {name} | {r['rank']} | {r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
                  f"{r['baseline'] / 2**20:.1f} | {r['error']:+.1%} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    worst = max(abs(r["error"]) for res in results for r in res["ranks"])
    print(f"worst error {worst:.1%}")
    return 0 if worst <= 0.10 else 1


def main_comm(names: Sequence[str] = ()) -> int:
    import tempfile

    print("| layout | group | op | planned bytes (both ranks) | counted bytes (both ranks) | equal |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    ok = True
    with tempfile.TemporaryDirectory() as work:
        for name in (names or COMM_LAYOUTS):
            for kind, op, planned, counted in compare_comm(name, work):
                same = planned == counted
                ok &= same
                equal = "yes" if same else "NO"
                print(f"| {name} | {kind} | {op} | {planned:,.0f} | {counted:,.0f} | {equal} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
