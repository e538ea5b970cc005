"""Learning-rate schedule with Megatron's OptimizerParamScheduler semantics (in iterations).

lr(n) for n completed optimizer steps:

* warmup (n <= warmup, warmup > 0): init + (max - init) * n / warmup
* constant: max
* n > decay_iters: min
* inverse-square-root: max(min, max * sqrt(max(warmup, 1)) / sqrt(max(n, 1)))
* linear / cosine over r = (n - warmup) / (decay - warmup): min + coeff(r) * (max - min),
  coeff = 1 - r, or (cos(pi r) + 1) / 2
* WSD: coeff 1 until decay - wsd_decay_iters, then over r' = (n - start) / wsd_decay_iters:
  linear 1 - r', cosine (cos(pi r') + 1) / 2, exponential 2 * 0.5^r' - 1, minus_sqrt 1 - sqrt(r').

As in Megatron, the scheduler is stepped after each successful optimizer step and sets the lr of
the next one, so the first iteration runs at lr(0) (= init lr when warming up).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


class OptimizerParamScheduler:
    """Computes the lr of step `num_steps` and pushes it into an optimizer with `set_lr`."""

    def __init__(
        self,
        optimizer: Any,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        init_lr: float = 0.0,
        wsd_decay_steps: Optional[int] = None,
        lr_wsd_decay_style: str = "exponential",
    ) -> None:
        if lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {lr_decay_style!r}")
        if max_lr < 0 or min_lr < 0 or min_lr > max_lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if lr_warmup_steps < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {lr_warmup_steps}")
        if lr_decay_steps is None or lr_decay_steps <= 0:
            raise ValueError(f"--lr-decay-iters must be positive, got {lr_decay_steps}")
        if lr_decay_style != "constant" and lr_warmup_steps >= lr_decay_steps and lr_decay_style != "inverse-square-root":
            raise ValueError(f"--lr-warmup-iters ({lr_warmup_steps}) must be < --lr-decay-iters ({lr_decay_steps})")
        if lr_decay_style == "WSD":
            if lr_wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style must be one of {WSD_DECAY_STYLES}, got {lr_wsd_decay_style!r}")
            if wsd_decay_steps is None or not 0 < wsd_decay_steps <= lr_decay_steps:
                raise ValueError(
                    f"WSD needs 0 < --lr-wsd-decay-iters ({wsd_decay_steps}) <= --lr-decay-iters ({lr_decay_steps})"
                )
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.lr_warmup_steps, self.lr_decay_steps = int(lr_warmup_steps), int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_run_config(cls, optimizer: Any, run: Any) -> "OptimizerParamScheduler":
        """Build from RunConfig.scheduler (decay iters default to train iters at parse time)."""
        s = run.scheduler
        if s.lr is None:
            raise ValueError("--lr is required for training")
        return cls(
            optimizer,
            max_lr=s.lr,
            min_lr=s.min_lr,
            lr_warmup_steps=s.lr_warmup_iters,
            lr_decay_steps=s.lr_decay_iters or run.training.train_iters or 1,
            lr_decay_style=s.lr_decay_style,
            init_lr=s.lr_warmup_init,
            wsd_decay_steps=s.lr_wsd_decay_iters,
            lr_wsd_decay_style=s.lr_wsd_decay_style,
        )

    def get_lr(self, num_steps: Optional[int] = None) -> float:
        """The learning rate after `num_steps` completed steps (default: the current count)."""
        n = self.num_steps if num_steps is None else num_steps
        warmup, decay = self.lr_warmup_steps, self.lr_decay_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (self.max_lr - self.init_lr) * n / warmup
        if self.lr_decay_style == "constant":
            return self.max_lr
        if n > decay:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
        ratio = (n - warmup) / (decay - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            start = decay - self.wsd_decay_steps
            if n <= start:
                coeff = 1.0
            else:
                r = (n - start) / self.wsd_decay_steps
                coeff = {
                    "linear": lambda: 1.0 - r,
                    "cosine": lambda: 0.5 * (math.cos(math.pi * r) + 1.0),
                    "exponential": lambda: 2.0 * math.pow(0.5, r) - 1.0,
                    "minus_sqrt": lambda: 1.0 - math.sqrt(r),
                }[self.lr_wsd_decay_style]()
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int = 1) -> float:
        """Advance by `increment` steps and set the optimizer's lr; returns it."""
        self.num_steps += increment
        lr = self.get_lr()
        if self.optimizer is not None:
            self.optimizer.set_lr(lr)
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_decay_style": self.lr_decay_style,
        }

    def load_state_dict(self, state: Dict[str, Any], use_checkpoint_values: bool = False) -> None:
        """Restore the step count (and, with `use_checkpoint_values`, the checkpoint's schedule)."""
        if "num_steps" not in state:
            raise ValueError("scheduler state has no 'num_steps'")
        if use_checkpoint_values:
            for key in ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style"):
                if key in state:
                    setattr(self, key, state[key])
        self.num_steps = 0
        self.step(int(state["num_steps"]))
