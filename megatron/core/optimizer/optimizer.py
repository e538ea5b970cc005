"""AdamW with fp32 master weights, global-norm clipping and non-finite skipping.

`MegatronOptimizer` keeps one `_Slot` per parameter it updates: the whole parameter here, this
rank's DP shard of it in the distributed optimizer (`distrib_optimizer.py`). Everything held by a
slot is flat fp32, of length hi - lo (the slot's element range of the flattened parameter):

    master      fp32 weights: a view of the parameter itself when it is fp32, otherwise an fp32
                copy written back (rounded) to the bf16 parameter after every step
    exp_avg     Adam first moment  (fp32)
    exp_avg_sq  Adam second moment (fp32)

Gradients are read from ``param.main_grad`` (the DDP buffer) or ``param.grad`` (unwrapped
modules) and converted to fp32 when needed. Parameter groups: "decay" and "no_decay" (biases and
1-D parameters such as norm weights); the training loop sets ``lr`` (and ``weight_decay``) on
``param_groups`` or through `set_lr` before each step.

State dict (plain tensors and primitives; see `state_dict` for the layout): an in-memory copy.
Sharded state (`sharded_state` / `load_sharded_state`): what distributed checkpoints use. The
optimizer describes, per parameter, the element range [lo, hi) of the flattened (TP/EP-local)
parameter it holds and LIVE views of its fp32 state for those elements; a checkpoint writes
those bytes as they are and loads by filling the same views, so no copy of the state is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from megatron.core.distributed.ddp import DistributedDataParallel, main_grad, unwrap_model
from megatron.core.device import device_of
from megatron.core.optimizer.adamw import FusedAdamWRunner, adamw_step_
from megatron.core.optimizer.fused import fused_clip_applicable, fused_clip_grads
from megatron.core.optimizer.clip_grads import clip_grads_, count_zeros, global_grad_norm
from megatron.core.optimizer.config import OptimizerConfig
from megatron.core.parallel_state import ParallelState

STATE_FORMAT = "megatron-deepseek-optimizer/1"
ModelChunk = Union[DistributedDataParallel, nn.Module]


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Megatron's rule: no decay for biases and 1-D parameters (norm weights)."""
    return not (param.dim() <= 1 or name.endswith(".bias"))


@dataclass
class _Slot:
    """Optimizer state for elements [lo, hi) of one flattened parameter."""

    param: nn.Parameter
    name: str
    chunk: int
    group: int  # index into param_groups
    lo: int
    hi: int
    master: Tensor  # fp32 [hi - lo]
    exp_avg: Tensor  # fp32 [hi - lo]
    exp_avg_sq: Tensor  # fp32 [hi - lo]
    owns_master: bool  # master is a copy (low-precision param), not a view of the param

    def grad(self) -> Optional[Tensor]:
        """fp32 flat gradient of the slot's elements (a view when already fp32), or None."""
        g = main_grad(self.param)
        if g is None:
            return None
        g = g.reshape(-1)[self.lo : self.hi]
        return g if g.dtype == torch.float32 else g.float()


@dataclass(frozen=True)
class ShardPiece:
    """Optimizer state of elements [lo, hi) of one flattened parameter, as live views.

    tensors: {"exp_avg", "exp_avg_sq"} and, for low-precision parameters, "master": fp32 [hi - lo]
    views of the optimizer's own buffers (fp32 parameters are their own master weights)."""

    name: str
    param: nn.Parameter
    lo: int
    hi: int
    tensors: Mapping[str, Tensor]


# fill(piece, key, out): write the saved values of `key` for piece's elements into `out` (fp32
# [hi - lo]) and return True, or return False when the saved state has no such values.
FillFn = Callable[[ShardPiece, str, Tensor], bool]


def _flat_param(param: nn.Parameter) -> Tensor:
    if not param.is_contiguous():
        raise ValueError("the optimizer needs contiguous parameters (flat views of their storage)")
    return param.data.view(-1)


class MegatronOptimizer:
    """Non-sharded AdamW over the parameters of `model_chunks` (DDP wrappers or plain modules)."""

    sharded = False  # grads / state are per-DP-rank shards (distributed optimizer)

    def __init__(self, model_chunks: Sequence[ModelChunk], config: OptimizerConfig, parallel_state: ParallelState) -> None:
        if not model_chunks:
            raise ValueError("build an optimizer over at least one model chunk")
        self.model_chunks, self.config, self.parallel_state = list(model_chunks), config, parallel_state
        self.param_groups: List[Dict[str, Any]] = [
            {"name": "decay", "lr": config.lr, "weight_decay": config.weight_decay, "wd_mult": 1.0},
            {"name": "no_decay", "lr": config.lr, "weight_decay": 0.0, "wd_mult": 0.0},
        ]
        self.step_count = 0
        self.slots: List[_Slot] = []
        names = self._param_names()
        for param, lo, hi in self._pieces():
            chunk, name = names[param]
            self.slots.append(self._make_slot(param, name, chunk, lo, hi))
        self.fused: Optional[FusedAdamWRunner] = None
        fused_cls = device_of(self.slots[0].master).fused_adamw() if config.use_fused_adamw and self.slots else None
        if fused_cls is not None:
            groups = [[(s.master, s.exp_avg, s.exp_avg_sq) for s in self.slots if s.group == g] for g in range(len(self.param_groups))]
            self.fused = FusedAdamWRunner(fused_cls, groups, (config.adam_beta1, config.adam_beta2), config.adam_eps)

    @property
    def uses_fused_adamw(self) -> bool:
        """Whether the update runs through the device's fused AdamW kernel."""
        return self.fused is not None

    # ---- construction ----------------------------------------------------------------------------
    def _param_names(self) -> Dict[nn.Parameter, Tuple[int, str]]:
        names: Dict[nn.Parameter, Tuple[int, str]] = {}
        for i, chunk in enumerate(self.model_chunks):
            for name, p in unwrap_model(chunk).named_parameters():
                names.setdefault(p, (i, name))
        return names

    def _pieces(self) -> List[Tuple[nn.Parameter, int, int]]:
        """(param, lo, hi) element ranges this optimizer updates: every trainable parameter, whole."""
        pieces, seen = [], set()
        for chunk in self.model_chunks:
            for p in unwrap_model(chunk).parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    pieces.append((p, 0, p.numel()))
        return pieces

    def _make_slot(self, param: nn.Parameter, name: str, chunk: int, lo: int, hi: int) -> _Slot:
        flat = _flat_param(param)[lo:hi]
        if param.dtype == torch.float32:
            master, owns = flat, False
        elif param.dtype == torch.bfloat16:
            if not self.config.bf16:
                raise ValueError(f"{name} is bf16: set OptimizerConfig.bf16 to keep fp32 master weights for it")
            master, owns = flat.detach().float().clone(), True
        else:
            raise ValueError(f"{name}: unsupported parameter dtype {param.dtype} (fp32 or bf16)")
        return _Slot(
            param=param, name=name, chunk=chunk, group=0 if uses_weight_decay(name, param) else 1, lo=lo, hi=hi,
            master=master, exp_avg=torch.zeros_like(master, dtype=torch.float32),
            exp_avg_sq=torch.zeros_like(master, dtype=torch.float32), owns_master=owns,
        )

    # ---- learning rate ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (the scheduler calls this each step)."""
        for group in self.param_groups:
            group["lr"] = float(lr)

    def set_weight_decay(self, weight_decay: float) -> None:
        """Set the decay of the "decay" group (the no-decay group keeps 0 through its wd_mult)."""
        for group in self.param_groups:
            group["weight_decay"] = float(weight_decay) * group["wd_mult"]

    def get_lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    # ---- step ------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the DDP gradient buffers (and drop ``.grad`` of unwrapped parameters)."""
        for chunk in self.model_chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.zero_grad_buffer()
            else:
                for p in chunk.parameters():
                    p.grad = None

    def _device(self) -> torch.device:
        for chunk in self.model_chunks:
            for p in unwrap_model(chunk).parameters():
                return p.device
        return torch.device("cpu")

    def get_grad_norm(self) -> float:
        """Global L2 norm of the current (final) gradients; collective over all ranks."""
        items = [(g, s.param) for s in self.slots if (g := s.grad()) is not None]
        return global_grad_norm(items, self.parallel_state, self.sharded, self._device())

    @torch.no_grad()
    def step(self) -> Tuple[bool, float, Optional[int]]:
        """Clip, check, update. Returns (success, grad_norm, num_zeros or None).

        Call after `finalize_model_grads`. success is False (and no weight, state or step counter
        changes) when the global gradient norm is NaN or Inf. Collective over all ranks.
        """
        live = [(s, g) for s in self.slots if (g := s.grad()) is not None]  # grad None: unused param (plain modules)
        items = [(g, s.param) for s, g in live]
        fused_norm = None
        if live and fused_clip_applicable(self.parallel_state, self.sharded):
            # One kernel computes the norm and clips (Gaudi); it leaves nothing to do when it ran.
            fused_norm = fused_clip_grads([g for _, g in live], self.config.clip_grad, device_of(live[0][1]))
        grad_norm = fused_norm if fused_norm is not None else global_grad_norm(
            items, self.parallel_state, self.sharded, self._device())
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        if fused_norm is None:
            clip_grads_([g for _, g in live], self.config.clip_grad, grad_norm)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            num_zeros = count_zeros(items, self.parallel_state, self.sharded, self._device())
        self.step_count += 1
        for index, group in enumerate(self.param_groups):
            members = [(s, g) for s, g in live if s.group == index]
            if self.fused is not None and len(members) == sum(s.group == index for s in self.slots):
                self.fused.step_(index, [g for _, g in members], step=self.step_count, lr=float(group["lr"]),
                                 weight_decay=float(group["weight_decay"]))
                continue
            adamw_step_(
                [s.master for s, _ in members], [g for _, g in members],
                [s.exp_avg for s, _ in members], [s.exp_avg_sq for s, _ in members],
                step=self.step_count, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                beta1=self.config.adam_beta1, beta2=self.config.adam_beta2, eps=self.config.adam_eps,
            )
        for s, _ in live:
            if s.owns_master:
                _flat_param(s.param)[s.lo : s.hi].copy_(s.master)
        self._after_update()
        return True, grad_norm, num_zeros

    def _after_update(self) -> None:
        """Hook for the distributed optimizer (all-gather the updated parameters)."""

    # ---- checkpointing -----------------------------------------------------------------------------
    def _header(self) -> Dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "layout": "dp_shard" if self.sharded else "full",
            "step": self.step_count,
            "param_groups": [dict(g) for g in self.param_groups],
        }

    def _entry(self, s: _Slot) -> Dict[str, Any]:
        shape = list(s.param.shape)
        view = (lambda t: t.detach().clone()) if self.sharded else (lambda t: t.detach().clone().view(shape))
        entry: Dict[str, Any] = {"exp_avg": view(s.exp_avg), "exp_avg_sq": view(s.exp_avg_sq)}
        if s.owns_master:
            entry["master"] = view(s.master)
        if self.sharded:
            entry.update(shape=shape, start=s.lo, end=s.hi, is_expert=bool(getattr(s.param, "is_expert", False)))
        return entry

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and primitives.

        {"format": STATE_FORMAT, "layout": "full", "step": int (completed steps),
         "param_groups": [{"name", "lr", "weight_decay", "wd_mult"}, ...],
         "params": [ {param name (as in the chunk's named_parameters): entry} per model chunk ]}
        entry: {"exp_avg", "exp_avg_sq": fp32 [param shape], "master": fp32 [param shape] only for
        low-precision parameters (fp32 parameters are their own master weights)}.
        The distributed optimizer's layout ("dp_shard") is documented in `distrib_optimizer`.
        """
        sd = self._header()
        sd["params"] = [{} for _ in self.model_chunks]
        for s in self.slots:
            sd["params"][s.chunk][s.name] = self._entry(s)
        return sd

    def sharded_state(self) -> Dict[str, Any]:
        """{"header": {"format", "step", "param_groups"}, "pieces": [ShardPiece]}.

        One piece per (parameter, element range) this rank updates: whole parameters here, this
        rank's DP shard of them in the distributed optimizer. Tensors are live views: read them to
        save (they change at the next step), write into them and call `load_sharded_state`."""
        header = {"format": STATE_FORMAT, "step": self.step_count, "param_groups": [dict(g) for g in self.param_groups]}
        pieces = []
        for s in self.slots:
            tensors = {"exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq}
            if s.owns_master:
                tensors["master"] = s.master
            pieces.append(ShardPiece(name=s.name, param=s.param, lo=s.lo, hi=s.hi, tensors=tensors))
        return {"header": header, "pieces": pieces}

    def load_sharded_state(self, header: Mapping[str, Any], fill: FillFn) -> None:
        """Restore from saved sharded state: `fill` provides each piece's tensors (see `FillFn`).

        exp_avg and exp_avg_sq must be found; a missing "master" (the saved parameter was fp32,
        or only weights were saved) is taken from the parameter, which must be loaded first. The
        step and parameter groups come from `header` (`sharded_state()["header"]` of the saver).
        Raises ValueError for a header of another format or other groups, and for missing state.
        """
        if header.get("format") != STATE_FORMAT:
            raise ValueError(f"not an optimizer state of format {STATE_FORMAT}: {header.get('format')!r}")
        groups = header.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError("saved parameter groups do not match")
        with torch.no_grad():
            for piece in self.sharded_state()["pieces"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    if not fill(piece, key, piece.tensors[key]):
                        raise ValueError(f"saved optimizer state lacks {key} of {piece.name}")
                if "master" in piece.tensors and not fill(piece, "master", piece.tensors["master"]):
                    piece.tensors["master"].copy_(_flat_param(piece.param)[piece.lo : piece.hi])
        for group, saved in zip(self.param_groups, groups):
            group.update({k: saved[k] for k in ("lr", "weight_decay", "wd_mult") if k in saved})
        self.step_count = int(header["step"])

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Copy the parameters into the fp32 master weights (after loading weights only)."""
        for s in self.slots:
            if s.owns_master:
                s.master.copy_(_flat_param(s.param)[s.lo : s.hi])

    def _check_header(self, sd: Dict[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not an optimizer state of format {STATE_FORMAT}: {sd.get('format')!r}")
        if len(sd["params"]) != len(self.model_chunks):
            raise ValueError(f"state has {len(sd['params'])} model chunks, the optimizer {len(self.model_chunks)}")

    def _slice(self, s: _Slot, entry: Dict[str, Any], key: str, layout: str) -> Tensor:
        value = entry[key]
        if layout == "full":
            if tuple(value.shape) != tuple(s.param.shape):
                raise ValueError(f"{s.name}: saved {key} shape {tuple(value.shape)} != parameter {tuple(s.param.shape)}")
            return value.reshape(-1)[s.lo : s.hi]
        if (entry["start"], entry["end"]) != (s.lo, s.hi):
            raise ValueError(
                f"{s.name}: saved shard [{entry['start']}, {entry['end']}) != this rank's [{s.lo}, {s.hi}); the DP "
                "layout changed: merge the shards with merge_optimizer_shards and load the full state"
            )
        return value

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore from `state_dict` output ("full" layout, or this rank's own "dp_shard").

        Saved master weights (present for low-precision parameters) are restored too; fp32
        parameters take their values from the model checkpoint instead.
        """
        self._check_header(sd)
        layout = sd["layout"]
        if layout not in ("full", "dp_shard") or (layout == "dp_shard" and not self.sharded):
            raise ValueError(f"cannot load a {layout!r} optimizer state here; merge_optimizer_shards first")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("saved parameter groups do not match")
        missing = [s.name for s in self.slots if s.name not in sd["params"][s.chunk]]
        if missing:
            raise ValueError(f"optimizer state lacks parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for s in self.slots:
                entry = sd["params"][s.chunk][s.name]
                s.exp_avg.copy_(self._slice(s, entry, "exp_avg", layout))
                s.exp_avg_sq.copy_(self._slice(s, entry, "exp_avg_sq", layout))
                if "master" in entry:
                    s.master.copy_(self._slice(s, entry, "master", layout))
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            group.update({k: saved[k] for k in ("lr", "weight_decay", "wd_mult") if k in saved})
        self.step_count = int(sd["step"])
