"""Megatron's console log line and the TensorBoard scalars, written by one rank.

The logging rank is the first rank of the last pipeline stage (it has the losses). Values are
accumulated over the iterations of a --log-interval window and averaged when the line prints.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch


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
        parts.append(f"MFU: {100 * values['mfu']:.2f}%")
    return " | ".join(parts) + " |"


class TrainingLogger:
    """Accumulates per-iteration values; prints the Megatron line and writes TensorBoard scalars."""

    def __init__(self, run: Any, is_logging_rank: bool, flops_per_token: float, peak_flops: float,
                 world_size: int, print_fn=print) -> None:
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
        self.history: List[Dict[str, Any]] = []  # one dict per printed line (tests read it)

    def _reset(self) -> None:
        self.loss_sums: Dict[str, float] = defaultdict(float)
        self.count = 0
        self.skipped_window = 0
        self.nan_window = 0
        self.window_start = time.perf_counter()
        self.iters_in_window = 0
        self.timer_sums: Dict[str, float] = defaultdict(float)

    def add(self, losses: Dict[str, float], skipped: bool, nan: bool, timers: Dict[str, float]) -> None:
        """Record one iteration (losses empty on ranks without them or when skipped)."""
        self.iters_in_window += 1
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

    def log(self, iteration: int, consumed: int, lr: float, grad_norm: Optional[float], num_zeros: Optional[float],
            extra: Optional[Dict[str, float]] = None) -> Optional[str]:
        """Print the line for the window ending at `iteration` and write its scalars; reset the window."""
        elapsed = (time.perf_counter() - self.window_start) / max(self.iters_in_window, 1)
        t = self.run.training
        tokens_per_s = t.global_batch_size * self.run.data.seq_length / elapsed
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        losses = {k: v / max(self.count, 1) for k, v in self.loss_sums.items()}
        values = dict(consumed_samples=consumed, elapsed_ms=elapsed * 1e3, lr=lr, global_batch_size=t.global_batch_size,
                      losses=losses, grad_norm=grad_norm, num_zeros=num_zeros, skipped=self.skipped_window,
                      nan=self.nan_window, tokens_per_s=tokens_per_s, tflops=achieved / 1e12,
                      mfu=achieved / self.peak_flops if self.peak_flops else 0.0)
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
            self.scalar("throughput/tokens-per-sec", tokens_per_s, step)
            self.scalar("throughput/tflops-per-device", achieved / 1e12, step)
            self.scalar("throughput/mfu", values["mfu"], step)
            self.scalar("iteration-time", elapsed, step)
            if self.run.logging.log_world_size_to_tensorboard:
                self.scalar("world-size", self.world_size, step)
            if self.run.logging.log_timers_to_tensorboard:
                for k, v in self.timer_sums.items():
                    self.scalar(f"timers/{k}", v / max(self.iters_in_window, 1), step)
            if self.run.logging.timing_log_level > 0 and self.timer_sums:
                per_iter = {k: 1e3 * v / max(self.iters_in_window, 1) for k, v in sorted(self.timer_sums.items())}
                self.print_fn("(ms per iteration) " + " | ".join(f"{k}: {v:.1f}" for k, v in per_iter.items()), flush=True)
            for k, v in (extra or {}).items():
                self.scalar(k, v, step)
        self._reset()
        return line

    def log_validation(self, iteration: int, losses: Dict[str, float], label: str = "validation") -> None:
        """Megatron's validation block, plus TensorBoard loss (and ppl with --log-validation-ppl-to-tensorboard)."""
        if not self.is_logging_rank:
            return
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


@torch.no_grad()
def moe_scalars(model: torch.nn.Module) -> Dict[str, float]:
    """Per MoE layer: expert load min/max/cv, dropped fraction, expert-bias mean/absmax."""
    out: Dict[str, float] = {}
    for layer in getattr(model, "moe_layers", lambda: [])():
        idx = getattr(layer, "layer_idx", None)
        prefix = f"moe/layer{idx}"
        stats = getattr(layer, "last_stats", None)
        if stats is not None and stats.tokens_per_expert is not None:
            load = stats.tokens_per_expert.float().cpu()
            mean = load.mean().item()
            out[f"{prefix}/load-min"] = load.min().item()
            out[f"{prefix}/load-max"] = load.max().item()
            out[f"{prefix}/load-cv"] = (load.std(unbiased=False).item() / mean) if mean > 0 else 0.0
        if stats is not None and stats.dropped_fraction is not None:
            out[f"{prefix}/dropped-fraction"] = float(stats.dropped_fraction)
        bias = getattr(getattr(layer, "router", None), "expert_bias", None)
        if bias is not None:
            out[f"{prefix}/expert-bias-mean"] = bias.float().mean().item()
            out[f"{prefix}/expert-bias-absmax"] = bias.float().abs().max().item()
    return out
