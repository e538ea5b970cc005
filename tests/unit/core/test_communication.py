"""Every collective goes through megatron.core.communication, and what it hands to the backend
lives on the rank's device (NCCL and HCCL reject CPU tensors; gloo would hide the mistake)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, List, Tuple

import pytest
import torch
import torch.distributed as dist

from megatron.core import communication as comm
from tests.dist_utils import spawn

REPO = Path(__file__).resolve().parents[3]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "broadcast", "barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "gather", "gather_object",
    "scatter", "scatter_object_list", "reduce", "monitored_barrier",
}
ALLOWED = {"megatron/core/communication.py"}


def _distributed_aliases(tree: ast.AST) -> set:
    """Names bound to torch.distributed in a module (`import torch.distributed as dist`, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed":
                    names.add(alias.asname or "torch.distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            names.update(a.asname or a.name for a in node.names if a.name == "distributed")
    return names


def test_no_collective_outside_the_communication_module():
    offenders: List[str] = []
    for path in sorted(list((REPO / "megatron").rglob("*.py")) + list((REPO / "tools").rglob("*.py")) + [REPO / "pretrain_gpt.py"]):
        rel = str(path.relative_to(REPO))
        if rel in ALLOWED:
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        aliases = _distributed_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                base = ast.unparse(node.value)
                if base in aliases or base == "torch.distributed":
                    offenders.append(f"{rel}:{node.lineno}: {base}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                offenders += [f"{rel}:{node.lineno}: from torch.distributed import {a.name}" for a in node.names if a.name in COLLECTIVES]
    assert not offenders, "collectives must go through megatron.core.communication:\n" + "\n".join(offenders)


class _Handed(Exception):
    """Raised by the stand-in once it has recorded a control tensor (its value cannot be read on meta)."""


class RecordingBackend:
    """torch.distributed's API as an NCCL world of 2 ranks that records the device of every tensor."""

    ReduceOp = dist.ReduceOp
    P2POp = dist.P2POp

    def __init__(self, stop_after_record: bool = False) -> None:
        self.calls: List[Tuple[str, List[torch.device]]] = []
        self.stop = stop_after_record

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group: Any = None) -> int:
        return 2

    def get_rank(self, group: Any = None) -> int:
        return 0

    def get_backend(self, group: Any = None) -> str:
        return "nccl"

    def _record(self, name: str, *tensors: Any) -> None:
        flat = []
        for t in tensors:
            flat += list(t) if isinstance(t, (list, tuple)) else [t]
        self.calls.append((name, [t.device for t in flat if isinstance(t, torch.Tensor)]))
        if self.stop:
            raise _Handed(name)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self._record("all_reduce", tensor)

    def broadcast(self, tensor, src=0, group=None):
        self._record("broadcast", tensor)


@pytest.mark.parametrize("call", [
    lambda device: comm.any_rank(True, device),
    lambda device: comm.broadcast_int(7, device),
    lambda device: comm.sum_floats([1.0, 2.0], device),
    lambda device: comm.barrier(device),
])
def test_control_collectives_allocate_on_the_named_device(call):
    backend = RecordingBackend(stop_after_record=True)
    device = torch.device("meta")  # stands for the rank's accelerator: anything but the CPU
    with comm.use_backend(backend), pytest.raises(_Handed):
        call(device)
    assert backend.calls and all(d == device for _, devices in backend.calls for d in devices), backend.calls


def _train_under_recording(rank: int, world: int, argv: List[str]) -> List[Tuple[str, List[str]]]:
    """A real 2-rank training run whose every collective is recorded on the way to gloo."""
    torch.set_num_threads(1)
    from megatron.training import training

    class Forwarding:
        """torch.distributed itself, recording the devices of what every collective receives."""

        def __init__(self) -> None:
            self.calls: List[Tuple[str, List[torch.device]]] = []

        def __getattr__(self, name: str) -> Any:
            real = getattr(dist, name)
            if name not in COLLECTIVES:
                return real

            def call(*args: Any, **kwargs: Any) -> Any:
                tensors = []
                for value in list(args) + list(kwargs.values()):
                    if isinstance(value, (list, tuple)):
                        tensors += [getattr(v, "tensor", v) for v in value]  # P2POp carries .tensor
                    else:
                        tensors.append(value)
                self.calls.append((name, [t.device for t in tensors if isinstance(t, torch.Tensor)]))
                return real(*args, **kwargs)

            return call

    backend = Forwarding()
    with comm.use_backend(backend):
        training.pretrain(argv)
    return [(name, [str(d) for d in devices]) for name, devices in backend.calls]


@pytest.mark.slow
def test_a_training_run_hands_only_device_tensors_to_collectives(tmp_path):
    """TP2+SP, distributed optimizer, kill-switch checks every iteration, a save: every collective of
    the run goes through the communication module, with tensors on the model's device."""
    from tests.unit.parallel.layout_harness import MODEL_FLAGS, TRAIN_FLAGS

    argv = MODEL_FLAGS + TRAIN_FLAGS + [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "2",
        "--kill-switch-file", str(tmp_path / "stop"), "--exit-signal-handler",
    ]
    calls = spawn(2, _train_under_recording, argv)[0]
    names = {name for name, _ in calls}
    assert {"all_reduce", "all_gather"} <= names, names
    devices = {d for _, ds in calls for d in ds}
    assert devices == {"cpu"}, devices  # the model's device on this machine
