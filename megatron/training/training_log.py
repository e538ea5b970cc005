"""Megatron's console log line and the TensorBoard scalars, written by one rank.

The logging rank is the first rank of the last pipeline stage (it has the losses). Values are
accumulated over the iterations of a --log-interval window and averaged when the line prints.
Console and TensorBoard use the same units: times in milliseconds (`iteration-time-ms`,
`timers/<name>`), MFU in percent (`throughput/mfu-percent`), throughput in tokens/s and TFLOP/s
per device.

`ExpertLoadLog` adds the MoE layers' routing statistics: per-expert token counts over the log
window summed over every rank (each rank routes distinct tokens), per layer load min / max / cv,
dropped fraction and expert-bias statistics, and with --moe-token-distribution-logging the
per-expert counts as TensorBoard histograms (and console lines with
--moe-token-distribution-logging-to-console). MoE layers are named `layer<i>` (decoder layer i)
and `mtp<d>` (multi-token-prediction depth d).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron.core import communication as comm


def format_log_line(iteration: int, train_iters: int, values: Dict[str, Any]) -> str:
    """`iteration N/ M | consumed samples: ... | ...` in Megatron's field order and formats."""
    parts = [f" iteration {iteration:8d}/{train_iters:8d}",
             f"consumed samples: {values['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {values['elapsed_ms']:.1f}",
             f"learning rate: {values['lr']:.6E}",
             f"global batch size: {values['global_batch_size']:5d}"]
    for name, value in values.get("losses", {}).items():
        parts.append(f"{name}: {value:.6E}")
    parts += [f"loss scale: {1.0:.1f}"]
    if values.get("grad_norm") is not None:
        parts.append(f"grad norm: {values['grad_norm']:.3f}")
    if values.get("num_zeros") is not None:
        parts.append(f"num zeros: {values['num_zeros']:.1f}")
    parts += [f"number of skipped iterations: {values['skipped']:3d}",
              f"number of nan iterations: {values['nan']:3d}"]
    if values.get("tokens_per_s") is not None:
        parts.append(f"tokens/s: {values['tokens_per_s']:.1f}")
        parts.append(f"TFLOP/s/device: {values['tflops']:.3f}")
        parts.append(f"MFU: {values['mfu_percent']:.2f}%")
    return " | ".join(parts) + " |"


class TrainingLogger:
    """Accumulates per-iteration values; prints the Megatron line and writes TensorBoard scalars.

    Every rank keeps the run totals the end-of-run summary reads (`iterations_run`,
    `train_seconds`); the logging rank also keeps every validation result (`validations`).
    """

    def __init__(self, run: Any, is_logging_rank: bool, flops_per_token: float, peak_flops: float,
                 world_size: int, print_fn: Callable[..., None] = print) -> None:
        self.run, self.is_logging_rank = run, is_logging_rank
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.print_fn = print_fn
        self.writer = None
        if is_logging_rank and run.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=run.logging.tensorboard_dir, max_queue=run.logging.tensorboard_queue_size)
        self._reset()
        self.skipped_total = 0
        self.nan_total = 0
        self.iterations_run = 0  # iterations this process ran (a resumed run counts from its start)
        self.train_seconds = 0.0  # time inside the training steps of those iterations
        self.history: List[Dict[str, Any]] = []  # one dict per printed line (tests read it)
        self.validations: List[Tuple[int, str, Dict[str, float]]] = []  # (iteration, label, losses)

    def _reset(self) -> None:
        self.loss_sums: Dict[str, float] = defaultdict(float)
        self.count = 0
        self.skipped_window = 0
        self.nan_window = 0
        self.window_start = time.perf_counter()
        self.iters_in_window = 0
        self.timer_sums: Dict[str, float] = defaultdict(float)

    def add(self, losses: Dict[str, float], skipped: bool, nan: bool, timers: Dict[str, float]) -> None:
        """Record one iteration (losses empty on ranks without them or when skipped); timers in seconds."""
        self.iters_in_window += 1
        self.iterations_run += 1
        self.train_seconds += timers.get("train-step", 0.0)
        self.skipped_window += int(skipped)
        self.nan_window += int(nan)
        self.skipped_total += int(skipped)
        self.nan_total += int(nan)
        if not skipped:
            for k, v in losses.items():
                self.loss_sums[k] += v
            self.count += 1
        for k, v in timers.items():
            self.timer_sums[k] += v

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None and math.isfinite(value):
            self.writer.add_scalar(name, value, step)

    def histogram_counts(self, name: str, counts: List[float], step: int) -> None:
        """A histogram with one bucket per index: bucket i (x = i) holds counts[i]."""
        total = float(sum(counts))
        if self.writer is None or total <= 0:
            return
        ids = range(len(counts))
        self.writer.add_histogram_raw(
            name, min=0.0, max=float(len(counts) - 1), num=total, sum=float(sum(i * c for i, c in zip(ids, counts))),
            sum_squares=float(sum(i * i * c for i, c in zip(ids, counts))),
            bucket_limits=[i + 0.5 for i in ids], bucket_counts=[float(c) for c in counts], global_step=step)

    def throughput(self, seconds_per_iteration: float) -> Dict[str, float]:
        """tokens/s, TFLOP/s per device and MFU (percent) at this many seconds per iteration."""
        t = self.run.training
        tokens_per_s = t.global_batch_size * self.run.data.seq_length / max(seconds_per_iteration, 1e-12)
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        return {"tokens_per_s": tokens_per_s, "tflops": achieved / 1e12,
                "mfu_percent": 100.0 * achieved / self.peak_flops if self.peak_flops else 0.0}

    def log(self, iteration: int, consumed: int, lr: float, grad_norm: Optional[float], num_zeros: Optional[float],
            extra: Optional[Dict[str, float]] = None) -> Optional[str]:
        """Print the line for the window ending at `iteration` and write its scalars; reset the window."""
        elapsed = (time.perf_counter() - self.window_start) / max(self.iters_in_window, 1)
        t = self.run.training
        losses = {k: v / max(self.count, 1) for k, v in self.loss_sums.items()}
        values = dict(consumed_samples=consumed, elapsed_ms=elapsed * 1e3, lr=lr, global_batch_size=t.global_batch_size,
                      losses=losses, grad_norm=grad_norm, num_zeros=num_zeros, skipped=self.skipped_window,
                      nan=self.nan_window, **self.throughput(elapsed))
        line = None
        if self.is_logging_rank:
            line = format_log_line(iteration, t.train_iters or 0, values)
            self.print_fn(line, flush=True)
            self.history.append({"iteration": iteration, **values})
            step = iteration
            for k, v in losses.items():
                self.scalar(k, v, step)
            self.scalar("learning-rate", lr, step)
            self.scalar("batch-size", t.global_batch_size, step)
            if grad_norm is not None:
                self.scalar("grad-norm", grad_norm, step)
            if num_zeros is not None:
                self.scalar("num-zeros", num_zeros, step)
            self.scalar("skipped-iterations", self.skipped_total, step)
            self.scalar("nan-iterations", self.nan_total, step)
            self.scalar("throughput/tokens-per-sec", values["tokens_per_s"], step)
            self.scalar("throughput/tflops-per-device", values["tflops"], step)
            self.scalar("throughput/mfu-percent", values["mfu_percent"], step)
            self.scalar("iteration-time-ms", values["elapsed_ms"], step)
            if self.run.logging.log_world_size_to_tensorboard:
                self.scalar("world-size", self.world_size, step)
            per_iter_ms = {k: 1e3 * v / max(self.iters_in_window, 1) for k, v in sorted(self.timer_sums.items())}
            if self.run.logging.log_timers_to_tensorboard:
                for k, v in per_iter_ms.items():
                    self.scalar(f"timers/{k}", v, step)
            if self.run.logging.timing_log_level > 0 and per_iter_ms:
                self.print_fn("(ms per iteration) " + " | ".join(f"{k}: {v:.1f}" for k, v in per_iter_ms.items()),
                              flush=True)
            for k, v in (extra or {}).items():
                self.scalar(k, v, step)
        self._reset()
        return line

    def log_validation(self, iteration: int, losses: Dict[str, float], label: str = "validation") -> None:
        """Megatron's validation block, plus TensorBoard loss (and ppl with --log-validation-ppl-to-tensorboard)."""
        if not self.is_logging_rank:
            return
        self.validations.append((iteration, label, dict(losses)))
        fields = [f"{k} value: {v:.6E} | {k} PPL: {math.exp(min(20.0, v)):.6E}" for k, v in losses.items()]
        line = f" {label} loss at iteration {iteration} | " + " | ".join(fields) + " |"
        self.print_fn("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        for k, v in losses.items():
            self.scalar(f"{k} {label}", v, iteration)
            if self.run.logging.log_validation_ppl_to_tensorboard:
                self.scalar(f"{k} {label} ppl", math.exp(min(20.0, v)), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# ---- MoE routing statistics ------------------------------------------------------------------------
def moe_layer_name(num_layers: int, layer_idx: int) -> str:
    """`layer<i>` for decoder layer i, `mtp<d>` for multi-token-prediction depth d (1-based)."""
    return f"layer{layer_idx}" if layer_idx < num_layers else f"mtp{layer_idx - num_layers + 1}"


class ExpertLoadLog:
    """Routing counts of every MoE layer of the model over logging windows, summed over all ranks.

    Every rank routes distinct tokens through its stage's routers (its data-parallel share, its
    sequence-parallel slice), and each pipeline stage fills only the rows of its own layers, so one
    all-reduce over all ranks of a [MoE layers, 2E + 1] table (E counts, dropped assignments, E
    expert-bias values written by one rank per stage) gives the logging rank every layer of every
    stage. `collect` runs on every rank at each --log-interval and, with
    --moe-token-distribution-logging, each --moe-token-distribution-logging-interval iteration.
    """

    def __init__(self, run: Any, model: Any, bias_writer: bool, device: torch.device, logger: TrainingLogger,
                 start_iteration: int = 0) -> None:
        cfg = run.model
        self.num_layers, self.num_experts = cfg.num_layers, cfg.moe.num_experts
        self.layers = [i for i in range(cfg.num_layers + cfg.mtp.num_layers) if cfg.is_moe_layer(i)]
        self.rows = {idx: n for n, idx in enumerate(self.layers)}
        self.has_bias = cfg.moe.enable_expert_bias
        self.model, self.bias_writer, self.device, self.logger = model, bias_writer, device, logger
        lg = run.logging
        self.log_interval = lg.log_interval
        self.dist_interval = lg.moe_token_distribution_logging_interval if lg.moe_token_distribution_logging else 0
        self.to_console = self.dist_interval > 0 and lg.moe_token_distribution_logging_to_console
        self.log_window: Optional[torch.Tensor] = None
        self.dist_window: Optional[torch.Tensor] = None
        self.dist_start = start_iteration + 1

    def names(self) -> List[str]:
        return [moe_layer_name(self.num_layers, i) for i in self.layers]

    def _table(self) -> torch.Tensor:
        """This collection's [layers, 2E + 1] table, summed over all ranks (one all-reduce)."""
        e = self.num_experts
        table = torch.zeros(len(self.layers), 2 * e + 1, dtype=torch.float32, device=self.device)
        for idx, load in self.model.take_expert_load_window().items():
            table[self.rows[idx], : e + 1] = load.to(table.device)
        if self.has_bias and self.bias_writer:
            for moe in self.model.moe_layers():
                if moe.router.expert_bias is not None:
                    table[self.rows[moe.layer_idx], e + 1 :] = moe.router.expert_bias.float()
        comm.all_reduce(table)
        return table

    def collect(self, iteration: int) -> Dict[str, float]:
        """Collect when a window ends at `iteration` (every rank); the log's scalars on the logging rank."""
        log_due = iteration % self.log_interval == 0
        dist_due = self.dist_interval > 0 and iteration % self.dist_interval == 0
        if not self.layers or not (log_due or dist_due):
            return {}
        table = self._table()
        if not self.logger.is_logging_rank:
            return {}
        e = self.num_experts
        loads = table[:, : e + 1].cpu()
        self.log_window = loads if self.log_window is None else self.log_window + loads
        self.dist_window = loads if self.dist_window is None else self.dist_window + loads
        if dist_due:
            self._write_distribution(iteration)
        if not log_due:
            return {}
        out = self._scalars(self.log_window, table[:, e + 1 :].cpu())
        self.log_window = None
        return out

    def _scalars(self, window: torch.Tensor, bias: torch.Tensor) -> Dict[str, float]:
        out: Dict[str, float] = {}
        e = self.num_experts
        for row, name in enumerate(self.names()):
            load, dropped = window[row, :e], float(window[row, e])
            total = float(load.sum())
            if total <= 0:
                continue
            prefix = f"moe/{name}"
            mean = total / e
            out[f"{prefix}/load-min"] = float(load.min())
            out[f"{prefix}/load-max"] = float(load.max())
            out[f"{prefix}/load-cv"] = float(load.std(unbiased=False)) / mean
            out[f"{prefix}/dropped-fraction"] = dropped / total
            if self.has_bias:
                out[f"{prefix}/expert-bias-mean"] = float(bias[row].mean())
                out[f"{prefix}/expert-bias-absmax"] = float(bias[row].abs().max())
        return out

    def _write_distribution(self, iteration: int) -> None:
        window = self.dist_window
        self.dist_window = None
        start, self.dist_start = self.dist_start, iteration + 1
        if window is None:
            return
        e = self.num_experts
        for row, name in enumerate(self.names()):
            counts = [float(c) for c in window[row, :e].tolist()]
            self.logger.histogram_counts(f"moe/{name}/tokens-per-expert", counts, iteration)
            if self.to_console:
                self.logger.print_fn(f"moe tokens per expert | {name} | iterations {start}-{iteration} | "
                                     + " ".join(str(int(round(c))) for c in counts), flush=True)
