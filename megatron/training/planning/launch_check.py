"""Pre-launch check of a training command line: validation, memory plan, nearest layouts that fit.

    python megatron/training/planning/launch_check.py --num-devices 8 --devices-per-node 8 \
        --device-type h100 --print-plan -- <pretrain_gpt.py flags>

(`python -m megatron.training.planning.launch_check` works too, in an environment that imports
this project.) Steps:

1. the flags go through `megatron.training.arguments.parse_args` for `--num-devices` ranks (file
   checks with `--check-paths`), exactly as pretrain_gpt.py reads them;
2. the device: `--device-type` (gaudi2, gaudi3, h100, h200, h800, cpu), or with `--detect
   hpu|cuda|auto` the model a vendor tool names on this node (`hl-smi -Q name -f csv,noheader`,
   `nvidia-smi --query-gpu=name --format=csv,noheader`; auto asks hl-smi first). A name is taken
   only when every card's name matches one known model (NAME_PATTERNS); otherwise there is no
   plan. `--device-memory-gb` replaces the memory per device; a cpu device without it gets the
   host's RAM divided by `--devices-per-node` (the ranks of a node share it);
3. the model as the run builds it: a `--use-checkpoint-args` checkpoint's model arguments, and
   the tokenizer's vocabulary when its files can be read (else the provisional one, noted);
4. `plan_for_run` on that device; `--print-plan` prints `format_plan`;
5. when it does not fit: the planner's search over layouts for the same number of devices
   (search.py), feasible ones ranked nearest first: fewest changed settings among TP, sequence
   parallel, PP (and its stage split), EP, token dispatcher, recompute and distributed optimizer
   (DP follows from TP x PP), then the shortest estimated step; `--nearest` of them are named.

The last line of the output is always a one-line summary (`fits: ...`, `does not fit: ...`,
`no memory plan: ...`, `error: ...`). Exit status: 0 fits, 1 bad input (a flag the trainer
rejects, or an option of this check), 2 this Python cannot import the project, 3 does not fit,
4 flags valid but no plan (device model unknown, checkpoint arguments unreadable or not
applicable to the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

FITS, BAD_INPUT, NO_IMPORT, DOES_NOT_FIT, NO_PLAN = 0, 1, 2, 3, 4

# Vendor tools that name the cards of this node, by the run's device.
DETECT_TOOLS: Dict[str, Tuple[str, ...]] = {
    "hpu": ("hl-smi", "-Q", "name", "-f", "csv,noheader"),
    "cuda": ("nvidia-smi", "--query-gpu=name", "--format=csv,noheader"),
}
DETECT_ORDER = {"hpu": ("hpu",), "cuda": ("cuda",), "auto": ("hpu", "cuda")}  # auto: as the ranks pick
# Card names -> planner device type. Gaudi 2 is HL-225*, Gaudi 3 HL-3xx (HL-325L OAM, HL-328
# PCIe, ...); NVIDIA names carry the model (H100 NVL, 94 GB, and GH200 are other products).
NAME_PATTERNS: Tuple[Tuple[str, str], ...] = (
    (r"^HL-225", "gaudi2"),
    (r"^HL-3\d\d", "gaudi3"),
    (r"\bH100\b(?!.*\bNVL\b)", "h100"),
    (r"\bH200\b", "h200"),
    (r"\bH800\b", "h800"),
)
DETECT_TIMEOUT_S = 30
RULE = "fewest changed settings, then fastest"


class InputError(Exception):
    """A bad option of this check (reported as one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message, exit 1
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch_check.py", allow_abbrev=False, add_help=True,
                description="Validate a pretrain_gpt.py command line and check that its layout fits in memory.")
    p.add_argument("--num-devices", type=int, required=True, help="World size (ranks of the job).")
    p.add_argument("--devices-per-node", type=int, default=None, help="Ranks per node.")
    p.add_argument("--device-type", default=None, help="gaudi2, gaudi3, h100, h200, h800 or cpu.")
    p.add_argument("--detect", choices=tuple(DETECT_ORDER), default=None,
                   help="Without --device-type: the model a vendor tool names on this node.")
    p.add_argument("--device-memory-gb", default=None, help="Memory per device, GB (1e9 bytes).")
    p.add_argument("--check-paths", action="store_true", help="Check data, tokenizer and checkpoint paths.")
    p.add_argument("--print-plan", action="store_true", help="Print the plan before the summary line.")
    p.add_argument("--nearest", type=int, default=3, help="Layouts that fit named when it does not fit (0: none).")
    return p


# ---- device -----------------------------------------------------------------------------------------
def device_type_from_names(names: Sequence[str]) -> Optional[str]:
    """The planner's device type when every name matches the same known model, else None."""
    names = [n.strip() for n in names if n.strip()]
    types = set()
    for name in names:
        match = [t for pattern, t in NAME_PATTERNS if re.search(pattern, name, re.I)]
        if len(match) != 1:
            return None
        types.add(match[0])
    return types.pop() if len(types) == 1 else None


def detect_device_type(run_device: str, runner: Callable[..., Any] = subprocess.run) -> Tuple[Optional[str], str]:
    """(device type or None, what the tools said) for a run on `run_device` (hpu, cuda, auto)."""
    said = []
    for kind in DETECT_ORDER[run_device]:
        cmd = DETECT_TOOLS[kind]
        if shutil.which(cmd[0]) is None:
            said.append(f"no {cmd[0]}")
            continue
        try:
            proc = runner(list(cmd), capture_output=True, text=True, timeout=DETECT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            said.append(f"{cmd[0]} failed ({type(exc).__name__})")
            continue
        names = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or not names:
            said.append(f"{cmd[0]} named no card (exit status {proc.returncode})")
            continue
        shown = ", ".join(sorted(set(names)))
        found = device_type_from_names(names)
        if found is not None:
            return found, f"{cmd[0]} names {shown!r}"
        said.append(f"{cmd[0]} names {shown!r}, not one model the planner has figures for")
    return None, "; ".join(said)


# ---- nearest layouts ----------------------------------------------------------------------------------
def _recompute_label(lay: Any) -> str:
    if not lay.recompute_granularity:
        return "none"
    if lay.recompute_granularity == "selective":
        return "selective " + ",".join(lay.recompute_modules)
    return f"full {lay.recompute_method} {lay.recompute_num_layers}"


def layout_changes(have: Any, cand: Any) -> List[str]:
    """The settings `cand` (a planning Layout) changes from `have`, as 'NAME old->new'.

    SP counts only when TP stays (the search turns it on with TP), the stage split only when PP
    stays, the dispatcher only when the candidate has EP > 1 (it routes nothing otherwise)."""
    out = []

    def diff(name: str, a: Any, b: Any) -> None:
        if a != b:
            out.append(f"{name} {a}->{b}")

    on = {True: "on", False: "off"}
    diff("TP", have.tp, cand.tp)
    if have.tp == cand.tp:
        diff("SP", on[have.sequence_parallel], on[cand.sequence_parallel])
    diff("PP", have.pp, cand.pp)
    if have.pp == cand.pp:
        diff("stages", list(have.stage_layers), list(cand.stage_layers))
    diff("EP", have.ep, cand.ep)
    if cand.ep > 1:
        diff("dispatcher", have.dispatcher, cand.dispatcher)
    diff("recompute", _recompute_label(have), _recompute_label(cand))
    diff("distributed optimizer", on[have.distributed_optimizer], on[cand.distributed_optimizer])
    return out


def nearest_fitting(have: Any, candidates: Sequence[Any], count: int) -> List[Tuple[Any, List[str]]]:
    """The `count` feasible candidates nearest to the layout `have`: fewest changes, then fastest."""
    ranked = sorted(((c, layout_changes(have, c.plan.layout)) for c in candidates if c.feasible),
                    key=lambda cc: (len(cc[1]), cc[0].plan.step["step"]))
    return ranked[:count]


# ---- the check ------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _peak_text(plan: Any) -> str:
    worst = max(plan.stages, key=lambda s: s.memory.peak)
    return (f"peak {_gib(worst.memory.peak)} on stage {worst.memory.stage} ({worst.memory.peak_phase}) "
            f"vs {_gib(plan.usable_bytes)} usable")


def _positive_gb(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"--device-memory-gb must be a positive number, got {text!r}")
    return value


def check(args: argparse.Namespace, argv: List[str], out: Any) -> Tuple[int, str]:
    """(exit status, summary line); the plan goes to `out` with --print-plan."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from megatron.training.arguments import apply_checkpoint_args, parse_args
            from megatron.training.planning.devices import DEVICE_TYPES, GB, get_device, host_memory_bytes
            from megatron.training.planning.plan import format_plan, plan_for_run
            from megatron.training.planning.search import search
    except Exception as exc:  # not this project's environment (no torch, another checkout, ...)
        return NO_IMPORT, f"error: cannot import this project: {type(exc).__name__}: {exc}"

    world, per_node = args.num_devices, args.devices_per_node
    for flag, value in (("--num-devices", world), ("--devices-per-node", per_node)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    memory_gb = _positive_gb(args.device_memory_gb)
    if args.device_type is not None and args.device_type not in DEVICE_TYPES:
        raise InputError(f"--device-type: unknown device type {args.device_type!r}; choose one of "
                         f"{', '.join(DEVICE_TYPES)}")
    try:
        run = parse_args(argv, world, check_paths=args.check_paths)
    except ValueError as exc:
        return BAD_INPUT, f"error: the training flags are invalid: {str(exc).splitlines()[0]}"

    notes: List[str] = []
    device_type = args.device_type
    if device_type is None:
        if args.detect is None:
            return NO_PLAN, "no memory plan: no device type given"
        device_type, said = detect_device_type(args.detect)
        if device_type is None:
            return NO_PLAN, f"no memory plan: the device model is unknown ({said})"
        notes.append(f"device type {device_type}: {said}")
    per_node = per_node or (world if device_type == "cpu" else None)
    if device_type == "cpu" and memory_gb is None:
        ram = host_memory_bytes()
        memory_gb = ram / per_node / GB
        notes.append(f"memory per rank: this host's RAM ({ram / 2**30:.1f} GiB) shared by {per_node} ranks")
    spec = get_device(device_type, memory_gb=memory_gb, devices_per_node=per_node, num_devices=world)

    # The model as the ranks build it: a checkpoint's arguments, then the tokenizer's vocabulary.
    saved = None
    if run.checkpoint.use_checkpoint_args and run.checkpoint.load:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                from megatron.training.checkpointing import checkpoint_args

                saved = checkpoint_args(run.checkpoint.load, run)
        except Exception as exc:
            return NO_PLAN, (f"no memory plan: the checkpoint arguments in {run.checkpoint.load} cannot be read "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    vocab: Optional[int] = None
    if not run.vocab_size_final and saved is None:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                from megatron.training.tokenizer import build_tokenizer

                vocab = int(build_tokenizer(run.tokenizer).vocab_size)
        except Exception as exc:
            notes.append(f"vocabulary {run.model.vocab_size} (provisional): the tokenizer could not be read "
                         f"({type(exc).__name__})")

    def as_built(r: Any) -> Any:
        if saved is not None:
            r = apply_checkpoint_args(r, saved)
        if vocab is not None and not r.vocab_size_final:
            r = r.with_tokenizer_vocab(vocab)
        return r

    def plan_run(r: Any) -> Any:
        return plan_for_run(as_built(r), device_type, device=spec)

    # Validation is parse_args' alone: what only the ranks would reject (a checkpoint's arguments
    # against the command line) leaves the check without a plan, the ranks report it.
    try:
        built = as_built(run)
    except Exception as exc:  # ValueError: a contradiction; others: arguments that do not read as a run's
        return NO_PLAN, (f"no memory plan: the checkpoint's model arguments do not apply "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            plan = plan_for_run(built, device_type, device=spec)
    except ValueError as exc:
        return NO_PLAN, f"no memory plan: {str(exc).splitlines()[0]}"
    plan.notes.extend(notes)
    if args.print_plan:
        print(format_plan(plan), file=out)
    if args.device_memory_gb is not None:
        where = f"{spec.name} with {memory_gb:g} GB"
    elif device_type == "cpu":
        where = f"CPU ({spec.memory_bytes / 2**30:.1f} GiB per rank)"
    else:
        where = spec.name
    if plan.fits:
        return FITS, f"fits on {where}: {_peak_text(plan)}"

    line = f"does not fit on {where}: predicted {_peak_text(plan)}"
    if args.nearest > 0:
        with contextlib.redirect_stdout(sys.stderr):
            found = search(plan.model, argv, world, spec.devices_per_node,
                           lambda cmd, w: plan_run(parse_args(cmd, w, check_paths=False)))
        near = nearest_fitting(plan.layout, found, args.nearest)
        if near:
            shown = [f"{c.name} [{', '.join(ch) or 'no layout change'}] peak {_gib(c.plan.peak_bytes)}, "
                     f"{c.plan.step['step']:.3g} s/step" for c, ch in near]
            line += f"; nearest layouts that fit on {world} devices ({RULE}): " + "; ".join(shown)
        else:
            line += f"; no layout of the planner's search fits on {world} devices"
    return DOES_NOT_FIT, line


def main(argv: Optional[Sequence[str]] = None, out: Any = None) -> int:
    out = sys.stdout if out is None else out
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        args = build_parser().parse_args(own)
        status, line = check(args, train, out)
    except InputError as exc:
        status, line = BAD_INPUT, f"error: {exc}"
    print(line, file=out)
    out.flush()
    return status


if __name__ == "__main__":
    # Run as a file: this folder's modules must not shadow others; the checkout's root goes first.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(_here))))
    sys.exit(main())
