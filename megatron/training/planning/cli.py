"""Command line of tools/plan_layout.py: planner flags plus pretrain_gpt.py's own flags.

    tools/plan_layout.py --model v3 --device-type gaudi3 --num-devices 64 \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 8 --expert-model-parallel-size 8 \
        --micro-batch-size 1 --global-batch-size 512 --seq-length 4096 --bf16 --use-distributed-optimizer

Every flag the planner does not own is handed to `megatron.training.arguments.parse_args`, so it
means what it means to pretrain_gpt.py; flags given explicitly override the preset. Flags a real
run needs but a plan does not are filled in when absent: --train-iters 1, --lr 1e-4, --mock-data
(unless a data path is given), --tokenizer-type NullTokenizer with the preset's vocabulary,
--micro-batch-size 1, --seq-length 4096. The world size is --num-devices, by default the
smallest one the layout accepts (TP x PP x the least DP that holds EP).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence, TextIO

from megatron.training.planning.devices import DEVICE_TYPES, get_device
from megatron.training.planning.plan import DEFAULT_HEADROOM, Plan, format_plan, plan_for_run
from megatron.training.planning.search import search
from megatron.training.planning.timing import COMM_EFFICIENCY, COMPUTE_EFFICIENCY

# --model short names (as HL_MODEL in examples/deepseek/pretrain_deepseek.sh) -> --model-preset.
MODEL_PRESETS = {"v3": "deepseek-v3", "v2": "deepseek-v2", "v2-lite": "deepseek-v2-lite", "tiny": "tiny"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plan_layout.py", allow_abbrev=False,
        description="Memory, communication and step-time plan of a DeepSeek training layout. "
                    "Any pretrain_gpt.py flag may follow (model and layout flags override the preset).",
    )
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default=None, help="Model preset (--model-preset works too).")
    p.add_argument("--device-type", choices=DEVICE_TYPES, default="h100")
    p.add_argument("--device-memory-gb", type=float, default=None, help="Memory per device, GB (1e9 bytes); CPU: RAM.")
    p.add_argument("--num-devices", type=int, default=None, help="World size (default: the smallest the layout accepts).")
    p.add_argument("--search", type=int, default=None, metavar="N", help="Rank the feasible layouts for N devices.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("--top", type=int, default=20, help="--search: feasible layouts shown in text mode.")
    p.add_argument("--peak-tflops", type=float, default=None, help="Override the dense peak TFLOP/s per device.")
    p.add_argument("--scale-up-gbps", type=float, default=None, help="Override the in-node GB/s per device and direction.")
    p.add_argument("--scale-out-gbps", type=float, default=None, help="Override the between-node GB/s per device and direction.")
    p.add_argument("--devices-per-node", type=int, default=None)
    p.add_argument("--memory-headroom", type=float, default=DEFAULT_HEADROOM,
                   help="Share of device memory kept free (allocator, runtime, workspaces).")
    p.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY, help="Achieved share of peak FLOP/s.")
    p.add_argument("--comm-efficiency", type=float, default=COMM_EFFICIENCY, help="Achieved share of link bandwidth.")
    return p


def _given(argv: Sequence[str], *flags: str) -> bool:
    return any(a.split("=", 1)[0] in flags for a in argv)


def complete_argv(argv: Sequence[str], model: Optional[str]) -> List[str]:
    """The pretrain_gpt.py command line: `argv` plus the run-only flags a plan does not need."""
    out = list(argv)
    if model is not None:
        if _given(out, "--model-preset"):
            raise ValueError("give --model or --model-preset, not both")
        out = ["--model-preset", MODEL_PRESETS[model]] + out
    defaults = [("--train-iters", "1"), ("--lr", "1e-4"), ("--micro-batch-size", "1"), ("--seq-length", "4096")]
    for flag, value in defaults:
        if not _given(out, flag, "--train-samples" if flag == "--train-iters" else flag):
            out += [flag, value]
    if not _given(out, "--mock-data", "--data-path", "--train-data-path"):
        out.append("--mock-data")
    if not _given(out, "--tokenizer-type"):
        vocab = _preset_vocab(out)
        out += ["--tokenizer-type", "NullTokenizer"]
        if not _given(out, "--vocab-size"):
            out += ["--vocab-size", str(vocab - 1)]  # NullTokenizer adds the eod id
    return out


def _preset_vocab(argv: Sequence[str]) -> int:
    from megatron.core.models.deepseek.presets import get_preset

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model-preset", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.model_preset is None:
        return 129280  # DeepSeek-V3 / V2 tokenizer size; pass --vocab-size or a tokenizer otherwise
    aliases = {"v3-671b": "deepseek-v3", "v2-236b": "deepseek-v2", "v2-lite": "deepseek-v2-lite"}
    return get_preset(aliases.get(known.model_preset, known.model_preset)).vocab_size


def default_world_size(argv: Sequence[str]) -> int:
    """TP x PP x the least DP whose TP x DP ranks hold EP x ETP."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size"):
        pre.add_argument(flag, type=int, default=1)
    pre.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    known, _ = pre.parse_known_args(list(argv))
    tp, pp, ep = known.tensor_model_parallel_size, known.pipeline_model_parallel_size, known.expert_model_parallel_size
    etp = known.expert_tensor_parallel_size or 1
    if min(tp, pp, ep, etp) < 1:
        raise ValueError("parallel sizes must be >= 1")
    dp = 1
    while (tp * dp) % (ep * etp):
        dp += 1
    return tp * pp * dp


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    from megatron.training.arguments import parse_args

    args, rest = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        full = complete_argv(rest, args.model)
        world = args.search or args.num_devices or default_world_size(full)

        def device_for(world_size: int):
            return get_device(args.device_type, memory_gb=args.device_memory_gb, peak_tflops=args.peak_tflops,
                              scale_up_gbps=args.scale_up_gbps, scale_out_gbps=args.scale_out_gbps,
                              devices_per_node=args.devices_per_node, num_devices=world_size)

        def plan_argv(cmd: List[str], world_size: int) -> Plan:
            run = parse_args(cmd, world_size, check_paths=False)
            return plan_for_run(run, args.device_type, headroom=args.memory_headroom, device=device_for(world_size),
                                compute_efficiency=args.compute_efficiency, comm_efficiency=args.comm_efficiency)

        if args.search is None:
            plan = plan_argv(full, world)
            print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan), file=out)
            return 0 if plan.fits else 2
        run = parse_args(_any_valid(full, world), world, check_paths=False)
        results = search(run.model, full, world, device_for(world).devices_per_node, plan_argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_search(results, args, world, out)
    return 0 if any(c.feasible for c in results) else 2


def _any_valid(argv: List[str], world: int) -> List[str]:
    """A command line for the model alone (layout flags dropped), to read the model config."""
    from megatron.training.planning.search import strip_layout_flags

    cmd = strip_layout_flags(argv)
    drop = {"--global-batch-size"}
    clean, skip = [], False
    for a in cmd:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in drop:
            skip = "=" not in a
            continue
        clean.append(a)
    return clean  # the global batch defaults to micro-batch x DP


def _print_search(results, args, world: int, out: TextIO) -> None:
    feasible = [c for c in results if c.feasible]
    if args.json:
        print(json.dumps({
            "num_devices": world,
            "feasible": [dict(name=c.name, flags=c.argv, step_time_s=c.plan.step["step"], peak_bytes=c.plan.peak_bytes,
                              tokens_per_s=c.plan.tokens_per_second, plan=c.plan.to_dict()) for c in feasible],
            "infeasible": [dict(name=c.name, reason=c.reason) for c in results if not c.feasible],
        }, indent=1), file=out)
        return
    print(f"{len(feasible)} feasible of {len(results)} layouts for {world} devices, fastest first:", file=out)
    print(f"{'rank':>4}  {'layout':<58} {'step s':>9} {'tokens/s':>11} {'peak GiB':>9}", file=out)
    for i, c in enumerate(feasible[: args.top], 1):
        print(f"{i:4d}  {c.name:<58} {c.plan.step['step']:9.3g} {c.plan.tokens_per_second:11,.0f} "
              f"{c.plan.peak_bytes / 2**30:9.1f}", file=out)
    if len(feasible) > args.top:
        print(f"  ... {len(feasible) - args.top} more feasible (--top to show them)", file=out)
    print("infeasible:", file=out)
    for c in results:
        if not c.feasible:
            print(f"  {c.name}: {c.reason}", file=out)
