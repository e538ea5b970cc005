"""What a training run tells its user besides the per-iteration log.

- `print_rank_0`: a message printed once, by global rank 0; before the process group exists the
  rank comes from the launcher's variables (torchrun, Open MPI, MPICH / Intel MPI). `print_rank`
  is for a message that is one rank's own (prefixed with the rank when there are several).
- `RunReport.print_startup`: model size (total and activated per token from the configuration,
  each rank's share from the built stages), the layout and batch, and where the outputs go
  (printed right after the resolved configuration, which ends with the pipeline stage map).
- `RunReport.after_save`: with --verify-checkpoint, rank 0 verifies every checkpoint right after
  it is saved and prints what was checked; a failure is a CheckpointError naming the file, on
  every rank.
- `exit_reason`: why the loop stops early (exit interval, SIGTERM, kill switch, duration), agreed
  on by every rank.
- `RunReport.print_end_summary`: iterations, tokens, wall time, mean tokens/s and MFU, best and
  final validation loss, where the checkpoints and TensorBoard files are and why the run stopped.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from megatron.core import communication as comm

PROCESS_START = time.time()  # this module is imported when the entry point starts
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def global_rank() -> int:
    """This process's rank: the process group's, else the launcher's variables, else 0."""
    if comm.initialized():
        return comm.rank()
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _world() -> int:
    if comm.initialized():
        return comm.world_size()
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def print_rank_0(msg: str) -> None:
    """Print `msg` on global rank 0 only."""
    if global_rank() == 0:
        print(msg, flush=True)


def print_rank(msg: str) -> None:
    """Print a message that is this rank's own, prefixed with the rank when there are several."""
    print(msg if _world() == 1 else f"[rank {global_rank()}] {msg}", flush=True)


def human(n: float) -> str:
    """6850123 -> '6.85M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


# ---- why the loop stops -------------------------------------------------------------------------------
def exit_reason(training: Any, iteration: int, sigterm: bool, start_time: float, device: torch.device) -> Optional[str]:
    """Why training stops after `iteration`, or None. The signal / kill switch / duration checks are
    combined over all ranks (one collective), so every rank stops at the same iteration."""
    t = training
    if t.exit_interval and iteration % t.exit_interval == 0:
        return f"exit interval {t.exit_interval} (--exit-interval)"
    if not (t.exit_signal_handler or t.kill_switch_file or t.exit_duration_in_mins):
        return None
    kill = bool(t.kill_switch_file and os.path.exists(t.kill_switch_file))
    late = bool(t.exit_duration_in_mins and (time.time() - start_time) / 60 > t.exit_duration_in_mins)
    signal_seen, kill_seen, late_seen = comm.sum_floats([float(sigterm), float(kill), float(late)], device)
    reasons = []
    if signal_seen:
        reasons.append("signal SIGTERM received (--exit-signal-handler)")
    if kill_seen:
        reasons.append(f"kill switch file {t.kill_switch_file} found (--kill-switch-file)")
    if late_seen:
        reasons.append(f"run time passed --exit-duration-in-mins {t.exit_duration_in_mins:g}")
    return "; ".join(reasons) or None


def _stopped(reason: str, run: Any) -> str:
    if reason == "train iters":
        return f"--train-iters {run.training.train_iters} reached"
    if reason == "skip train":
        return "--skip-train: evaluation only"
    return reason


# ---- the report ---------------------------------------------------------------------------------------
class RunReport:
    """Start-up report, checkpoint verification and end-of-run summary of one run (every rank
    holds one; the collectives in it are called by every rank)."""

    def __init__(self, run: Any, device: torch.device, start_iteration: int) -> None:
        self.run, self.device, self.start_iteration = run, device, start_iteration
        self.saved: List[int] = []
        self.verified: List[int] = []

    # -- start-up
    def print_startup(self, model: torch.nn.Module, state: Any, device_kind: str) -> None:
        """Model size, each rank's share, layout, batch and outputs (rank 0 prints)."""
        from megatron.training.planning.params import model_counts

        world = comm.world_size()
        rank = comm.rank()
        mine = [0.0] * world
        mine[rank] = float(sum(p.numel() for p in model.parameters()))
        per_rank = comm.sum_floats(mine, self.device)
        if rank != 0:
            return
        print(format_startup(self.run, model_counts(self.run.model), per_rank, state, device_kind), flush=True)

    # -- checkpoints
    def after_save(self, iteration: int) -> None:
        """Record the save; with --verify-checkpoint rank 0 verifies it (every data block re-hashed)
        and prints what it checked; a failure is the same CheckpointError, naming the file, on every rank."""
        self.saved.append(iteration)
        c = self.run.checkpoint
        if not c.verify_checkpoint:
            return
        from megatron.training.checkpoint_io import CheckpointError

        start = time.perf_counter()
        summary = _verify_collectively(c.save)
        if summary.get("iteration") != iteration:
            raise CheckpointError(f"{c.save}: verification found iteration {summary.get('iteration')}, not the "
                                  f"{iteration} just saved")
        print_rank_0(format_verification(summary, time.perf_counter() - start))
        self.verified.append(iteration)

    # -- end of run
    def print_end_summary(self, iteration: int, consumed: Dict[str, int], logger: Any, reason: str) -> None:
        """The end-of-run summary (rank 0 prints; the validation results come from the logging rank)."""
        best = _best_and_final(logger.validations if logger.is_logging_rank else [])
        best = comm.sum_floats(best, self.device)  # only the logging rank contributes
        if comm.rank() != 0:
            return
        print(format_end_summary(self.run, iteration, self.start_iteration, consumed, logger, reason, best,
                                 self.saved, self.verified), flush=True)


def _verify_collectively(directory: str) -> Dict[str, Any]:
    """Rank 0 verifies `directory`; every rank returns its summary or raises the same CheckpointError."""
    from megatron.training.checkpointing import verify_saved_checkpoint

    return verify_saved_checkpoint(directory)


def format_verification(s: Dict[str, Any], seconds: float) -> str:
    """One line: what --verify-checkpoint checked and the result."""
    checked = [f"{s.get('model_tensors', 0)} model and {s.get('optimizer_tensors', 0)} optimizer tensors tiled exactly",
               f"{s.get('files', 0)} data files ({human(s.get('bytes', 0))}B) block by block against their sha256",
               "index.json, common.json and RNG files against their checksums", "the tracker"]
    return (f"verified checkpoint iteration {s.get('iteration')} in {s.get('path')} ({s.get('kind')}, saved by "
            f"{s.get('world_size')} ranks): " + "; ".join(checked) + f": OK ({seconds:.1f} s)")


def _best_and_final(validations: Sequence[Any]) -> List[float]:
    """[count, best lm loss, its iteration, final lm loss, its iteration] of the validation results."""
    rows = [(it, losses["lm loss"]) for it, label, losses in validations
            if label.startswith("validation") and "lm loss" in losses]
    if not rows:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    best = min(rows, key=lambda r: r[1])
    return [float(len(rows)), best[1], float(best[0]), rows[-1][1], float(rows[-1][0])]


def format_startup(run: Any, counts: Any, per_rank: Sequence[float], state: Any, device_kind: str) -> str:
    """The start-up report: model size, parameters per rank, layout, batch, outputs."""
    m, p, t, lg, c = run.model, run.parallel, run.training, run.logging, run.checkpoint
    world = len(per_rank)
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    dp = run.data_parallel_size
    lines = [f"> model: {human(counts.total)} parameters ({counts.total:,}; "
             f"without MTP {human(counts.total_without_mtp)}, "
             f"routed experts {human(counts.routed_expert)}, embedding {human(counts.embedding)}); "
             f"activated per token {human(counts.activated_per_token)} ({counts.activated_per_token:,}; "
             "input embedding excluded, top-k experts)"]
    big = max(range(world), key=lambda r: per_rank[r])
    lines.append(f"> parameters on rank 0: {human(per_rank[0])} ({int(per_rank[0]):,}, "
                 f"{100 * per_rank[0] / max(counts.total, 1):.1f}% of the model)"
                 + (f"; largest rank {big}: {human(per_rank[big])}; smallest: {human(min(per_rank))}" if world > 1 else ""))
    local = m.moe.num_experts // ep
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    lines.append(f"> layout: {ranks} = DP {dp} x TP {tp} x PP {pp}; EP {ep} ({local} of {m.moe.num_experts} "
                 f"experts per rank); sequence parallel {'on' if p.sequence_parallel else 'off'}; device {device_kind}, "
                 f"{m.params_dtype}")
    tokens = t.global_batch_size * run.data.seq_length
    lines.append(f"> batch: global {t.global_batch_size} x {run.data.seq_length} tokens = {tokens:,} tokens per iteration; "
                 f"micro-batch {t.micro_batch_size}, {run.num_microbatches} micro-batch"
                 f"{'es' if run.num_microbatches > 1 else ''} per iteration and DP rank")
    out = [f"console every {lg.log_interval} iterations" if lg.log_interval > 1 else "console every iteration"]
    out.append(f"TensorBoard {lg.tensorboard_dir}" if lg.tensorboard_dir else "no TensorBoard (--tensorboard-dir)")
    if lg.moe_token_distribution_logging:
        out.append(f"per-expert token counts every {lg.moe_token_distribution_logging_interval} iterations "
                   "(TensorBoard moe/<layer>/tokens-per-expert"
                   + (", console" if lg.moe_token_distribution_logging_to_console else "") + ")")
    if c.save:
        out.append(f"checkpoints every {c.save_interval} iterations to {c.save}"
                   + (", each verified after saving" if c.verify_checkpoint else ""))
    else:
        out.append("no checkpoints (--save)")
    lines.append("> outputs: " + "; ".join(out))
    return "\n".join(lines)


def format_end_summary(run: Any, iteration: int, start_iteration: int, consumed: Dict[str, int], logger: Any,
                       reason: str, validation: Sequence[float], saved: Sequence[int], verified: Sequence[int]) -> str:
    """The end-of-run summary block."""
    seq = run.data.seq_length
    ran = logger.iterations_run
    tokens = ran * run.training.global_batch_size * seq
    lines = ["=" * 30 + " end of run " + "=" * 30,
             f"stopped: {_stopped(reason, run)}",
             f"iterations: {iteration} ({ran} in this run, from iteration {start_iteration}); tokens: {tokens:,} in this "
             f"run ({consumed.get('train', 0) * seq:,} trained in total)"]
    wall = time.time() - PROCESS_START
    if logger.train_seconds > 0 and ran:
        rate = logger.throughput(logger.train_seconds / ran)
        lines.append(f"time: {_seconds(wall)} wall since start-up, {_seconds(logger.train_seconds)} in training steps; "
                     f"mean {rate['tokens_per_s']:.1f} tokens/s, {rate['tflops']:.3f} TFLOP/s/device, "
                     f"MFU {rate['mfu_percent']:.2f}%")
    else:
        lines.append(f"time: {_seconds(wall)} wall since start-up; no training steps")
    count, best, best_it, final, final_it = validation
    if count:
        lines.append(f"validation lm loss: best {best:.6E} at iteration {int(best_it)}, final {final:.6E} at "
                     f"iteration {int(final_it)} ({int(count)} evaluation{'s' if count > 1 else ''})")
    else:
        lines.append("validation lm loss: not evaluated")
    c, lg = run.checkpoint, run.logging
    if c.save and saved:
        lines.append(f"checkpoints: {os.path.abspath(c.save)} (last saved: iteration {saved[-1]}"
                     + (f"; {len(verified)} verified" if c.verify_checkpoint else "") + ")")
    elif c.save:
        lines.append(f"checkpoints: {os.path.abspath(c.save)} (none saved in this run)")
    else:
        lines.append("checkpoints: none (no --save)")
    if lg.tensorboard_dir:
        tb = os.path.abspath(lg.tensorboard_dir)
        lines.append(f"tensorboard: {tb} (tensorboard --logdir {tb})")
    else:
        lines.append("tensorboard: none (no --tensorboard-dir)")
    lines.append("=" * 72)
    return "\n".join(lines)
