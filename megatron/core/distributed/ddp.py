"""Data-parallel wrapper: flat gradient buffers, micro-batch accumulation, (overlapped) DP reduction.

`DistributedDataParallel(module, config, parallel_state)` keeps the module as ``.module`` and
forwards calls and attribute look-ups to it, so parameter and state-dict names are unchanged
(``ddp.named_parameters()`` is ``module.named_parameters()``). It is NOT an nn.Module itself.
Its own attributes are ``module``, ``ddp_config``, ``parallel_state``, ``grad_buffers`` and
``param_to_buffer``; any other name (``ddp.config``, ``ddp.buffers()``, ``ddp.train()``) is the module's.

What it does to the module's parameters (requires_grad ones):
- ``param.main_grad``: a view into a flat per-kind gradient buffer (see `grad_buffer`), fp32 with
  `grad_reduce_in_fp32`, else the parameter dtype;
- a post-accumulate-grad hook adds each fresh ``param.grad`` into ``main_grad`` and frees it,
  so gradients accumulate over micro-batches in the buffer;
- with the distributed optimizer, ``param.data`` becomes a view into a flat parameter buffer.
  Do not move or cast the module (``.to()``, ``.half()``) after wrapping.

Buffers are built per (is_expert, deferred, param dtype). Reduction groups and scaling:
- dense parameters: summed over "dp" after scaling by 1/|dp|  (the DP average);
- ``is_expert`` parameters: summed over "edp", scaled by 1/|dp| as well. An expert's gradient
  already sums the losses of the EP ranks whose tokens it processed (the dispatcher's backward
  brings them back), so sum over edp / |dp| equals the gradient of the global-batch mean loss;
  with EP = 1 this is exactly the edp average;
- "deferred" parameters (``shared_embedding``): their gradients must first be summed over the
  embedding group by `finalize_model_grads` (the first and last stages' buffers have different
  layouts), so their buckets are never launched from backward hooks, only by `finish_grad_sync`.
  (``sequence_parallel`` grads are summed over TP after the DP reduction; no deferral needed.)

Gradient accumulation: run backward of every micro-batch but the last inside ``with
ddp.no_sync():``; with `overlap_grad_reduce` the last backward launches each bucket's async
collective as soon as all its gradients are in; `finish_grad_sync` launches the rest and waits.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from megatron.core.distributed.config import DDPConfig
from megatron.core.distributed.grad_buffer import GradBuffer
from megatron.core.parallel_state import ParallelState


def is_deferred(param: nn.Parameter) -> bool:
    """Parameters whose grads need an embedding-group sum before the DP reduction."""
    return bool(getattr(param, "shared_embedding", False))


class DistributedDataParallel:
    """Wraps one model chunk; see the module docstring."""

    def __init__(self, module: nn.Module, config: DDPConfig, parallel_state: ParallelState) -> None:
        self.module, self.ddp_config, self.parallel_state = module, config, parallel_state
        dp_group, edp_group = parallel_state.group("dp"), parallel_state.group("edp")
        dp_size = parallel_state.size("dp")
        self._sync_enabled = True
        self._hooks: List[Any] = []

        # Group parameters by kind, in reverse registration order (≈ gradient arrival order).
        kinds: Dict[Tuple[bool, bool, torch.dtype], List[Tuple[str, nn.Parameter]]] = {}
        seen = set()
        for name, p in reversed(list(module.named_parameters())):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            key = (bool(getattr(p, "is_expert", False)), is_deferred(p), p.dtype)
            kinds.setdefault(key, []).append((name, p))
        self.grad_buffers: List[GradBuffer] = []
        for (expert, deferred, dtype) in sorted(kinds, key=lambda k: (k[0], k[1], str(k[2]))):
            grad_dtype = torch.float32 if config.grad_reduce_in_fp32 else dtype
            bucket_numel = None
            if config.bucket_size_mb is not None:
                bucket_numel = max(1, int(config.bucket_size_mb * 2**20) // torch.empty((), dtype=grad_dtype).element_size())
            self.grad_buffers.append(
                GradBuffer(
                    kinds[(expert, deferred, dtype)],
                    grad_dtype=grad_dtype,
                    group=edp_group if expert else dp_group,
                    scale=1.0 / dp_size,
                    bucket_numel=bucket_numel,
                    distributed_optimizer=config.use_distributed_optimizer,
                    average_in_collective=config.average_in_collective,
                    is_expert=expert,
                    deferred=deferred,
                )
            )
        self.param_to_buffer: Dict[nn.Parameter, GradBuffer] = {p: b for b in self.grad_buffers for p in b.params}
        for p in self.param_to_buffer:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook()))
        if config.overlap_param_gather:
            self._register_param_gather_waits()

    # ---- module passthrough ------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found on the wrapper: delegate to the wrapped module
        # (named_parameters, state_dict, load_state_dict, train, eval, config fields, ...).
        if name == "module":  # not yet set (during unpickling or a failed __init__)
            raise AttributeError(name)
        return getattr(self.module, name)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[Tuple[str, nn.Parameter]]:
        return self.module.named_parameters(*args, **kwargs)

    def parameters(self, *args: Any, **kwargs: Any) -> Iterator[nn.Parameter]:
        return self.module.parameters(*args, **kwargs)

    # ---- hooks ---------------------------------------------------------------------------------
    def _make_hook(self):
        def hook(param: nn.Parameter) -> None:
            if param.grad is None:
                return
            buffer = self.param_to_buffer[param]
            if buffer.param_bucket[param].launched:
                raise RuntimeError(
                    f"gradient of {buffer.names[param]} arrived after its bucket's reduction started"
                )
            param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
            param.grad = None
            if self.ddp_config.overlap_grad_reduce and self._sync_enabled and not buffer.deferred:
                buffer.mark_ready(param, async_op=True)

        return hook

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the buffers and main_grad views stay)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- gradient synchronisation --------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate (every micro-batch but the last)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Launch the DP/EDP collective of every bucket not launched yet (async with overlap)."""
        for buffer in self.grad_buffers:
            buffer.launch_remaining(async_op=self.ddp_config.overlap_grad_reduce)

    def finish_grad_sync(self) -> None:
        """Complete the DP/EDP reduction: after this every main_grad (or, with the distributed
        optimizer, this rank's shard of every buffer) holds the averaged gradient."""
        self.start_grad_sync()
        for buffer in self.grad_buffers:
            buffer.wait()

    def zero_grad_buffer(self) -> None:
        """Zero the gradient buffers and drop any stray ``param.grad``; call before each step's first micro-batch."""
        for buffer in self.grad_buffers:
            buffer.wait()  # never zero under an in-flight collective
            buffer.zero()
        for p in self.param_to_buffer:
            p.grad = None

    # ---- distributed optimizer -----------------------------------------------------------------
    def all_gather_params(self) -> None:
        """All-gather updated parameter shards over dp / edp (distributed optimizer only). With
        `overlap_param_gather` the all-gathers stay in flight and each module waits for the buckets
        of its own parameters just before its forward, so communication overlaps the next forward."""
        for buffer in self.grad_buffers:
            buffer.all_gather_params(async_op=self.ddp_config.overlap_param_gather)

    def finish_param_sync(self) -> None:
        """Complete every in-flight parameter all-gather (before parameters are read outside a
        forward: checkpoint saves, evaluation of another chunk, the end of training)."""
        for buffer in self.grad_buffers:
            buffer.wait_params()

    def _register_param_gather_waits(self) -> None:
        bucket_of = {id(p): (buffer, bucket) for buffer in self.grad_buffers for bucket in buffer.buckets for p in bucket.params}
        for module in self.module.modules():
            owned = [bucket_of[id(p)] for p in module.parameters(recurse=False) if id(p) in bucket_of]
            if not owned:
                continue
            unique = list({id(bucket): (buffer, bucket) for buffer, bucket in owned}.values())

            def wait(_module: nn.Module, _inputs: Any, unique=unique) -> None:
                for buffer, bucket in unique:
                    buffer.wait_params(bucket)

            self._hooks.append(module.register_forward_pre_hook(wait))

    def __repr__(self) -> str:
        kinds = ", ".join(
            f"{'expert' if b.is_expert else 'dense'}{'/deferred' if b.deferred else ''} {b.param_dtype}->"
            f"{b.grad_dtype} x{len(b.buckets)}" for b in self.grad_buffers
        )
        return f"DistributedDataParallel(buffers=[{kinds}],\n  module={self.module!r})"


def unwrap_model(model: Any) -> nn.Module:
    """The wrapped module of a DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def main_grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer should read: the DDP buffer view when wrapped, else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad
