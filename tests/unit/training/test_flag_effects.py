"""Flags that change how a run executes do what they say: deterministic mode, shared-expert
overlap, profiling, --skip-train evaluation, HPU lazy-mode defaults and per-layer graph breaks,
and static shapes of the padded MoE path."""

from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.transformer.moe import MoELayer
from megatron.core.transformer.parallel_context import ExpertParallelContext, ParallelContext
from megatron.training.arguments import parse_args
from megatron.training.training import gpt_forward_step, pretrain
from tests.unit.core.models.tiny_model import tiny_config
from tests.unit.core.transformer.moe.moe_test_utils import initialized
from tests.unit.core.transformer.moe.moe_test_utils import tiny_config as moe_config
from tests.unit.parallel.layout_harness import MODEL_FLAGS, TRAIN_FLAGS

RUN = MODEL_FLAGS + TRAIN_FLAGS


def _losses(summary) -> List[Tuple[float, ...]]:
    return [tuple(sorted(step.items())) for step in summary["losses"]]


def test_deterministic_mode_is_on_during_the_run_and_repeats_bitwise():
    seen = []

    def forward_step(data_iterator, model):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return gpt_forward_step(data_iterator, model)

    try:
        argv = RUN + ["--train-iters", "2", "--deterministic-mode"]
        first, second = pretrain(argv, forward_step), pretrain(argv, forward_step)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen and all(seen)
    assert _losses(first) == _losses(second)
    assert [h["grad_norm"] for h in first["history"]] == [h["grad_norm"] for h in second["history"]]
    seen.clear()
    pretrain(RUN + ["--train-iters", "1"], forward_step)
    assert seen and not any(seen)


@pytest.mark.parametrize("overlap", [True, False])
def test_shared_expert_overlap_is_a_real_switch(overlap):
    cfg = moe_config(num_shared_experts=1)
    layer = initialized(MoELayer(cfg, 0, ParallelContext(ep=ExpertParallelContext(overlap_shared_experts=overlap))), seed=4)
    reference = initialized(MoELayer(cfg, 0), seed=4)
    events: List[str] = []
    layer.shared_experts.register_forward_hook(lambda *a: events.append("shared"))
    dispatch = layer.dispatcher.dispatch_async

    def recording_dispatch(rows, plan):
        pending = dispatch(rows, plan)
        wait = pending.wait
        pending.wait = lambda: (events.append("wait"), wait())[1]
        return pending

    layer.dispatcher.dispatch_async = recording_dispatch
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    assert events == (["shared", "wait"] if overlap else ["wait", "shared"])


def test_profile_type_writes_a_trace_and_says_where(tmp_path, capsys):
    argv = RUN + ["--train-iters", "3", "--profile-type", "pt", "--profile-step-start", "1", "--profile-step-end", "2",
                  "--tensorboard-dir", str(tmp_path / "tb")]
    pretrain(argv)
    traces = list((tmp_path / "tb" / "traces").glob("*.json*"))
    assert traces, list(tmp_path.rglob("*"))
    assert f"profiler trace of iterations 1-2 written to {tmp_path / 'tb' / 'traces'}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--profile-type hltv records Gaudi HPU activity"):
        pretrain(RUN + ["--train-iters", "1", "--profile-type", "hltv"])


def test_skip_train_evaluates_validation_and_test(capsys):
    summary = pretrain(RUN + ["--skip-train", "--eval-iters", "2", "--split", "90,5,5"])
    assert summary["exit_reason"] == "skip train" and summary["iteration"] == 0
    for split in ("valid", "test"):
        assert set(summary["evaluations"][split]) >= {"lm loss"}
        assert 0 < summary["evaluations"][split]["lm loss"] < 20
    assert "lm loss PPL" in capsys.readouterr().out


def test_end_of_training_validation_is_not_repeated(capsys):
    summary = pretrain(RUN + ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1"])
    assert "valid" not in summary["evaluations"]  # the loop validated iteration 2 already
    assert capsys.readouterr().out.count("validation loss at iteration 2") == 1


def test_lazy_mode_defaults_to_static_moe_shapes():
    base = [a for a in RUN if a != "--mock-data"] + ["--mock-data", "--train-iters", "1"]
    run = parse_args(base + ["--use-lazy-mode", "1"], world_size=1)
    moe = run.model.moe
    assert (moe.capacity_factor, moe.pad_to_capacity, run.distributed.moe_token_dispatcher_type) == (1.0, True, "alltoall")
    assert any(n.startswith("HPU lazy mode: MoE uses static shapes") for n in run.notes)
    run = parse_args(base + ["--use-lazy-mode", "1", "--moe-token-dispatcher-type", "allgather"], world_size=1)
    assert run.model.moe.capacity_factor is None
    assert any("graphs recompile as routing changes" in n for n in run.notes)
    assert parse_args(base, world_size=1).model.moe.capacity_factor is None


class _LazyStub:
    """The parts of a Device that build_model_stage uses, in HPU lazy mode, counting mark_step."""

    lazy_mode = True

    def __init__(self) -> None:
        self.steps = 0

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def mark_step(self) -> None:
        self.steps += 1


def test_mark_step_per_layer_breaks_the_graph_after_every_decoder_layer():
    from megatron.core.config import RecomputeConfig
    from megatron.training.model_builder import build_model_stage

    config = tiny_config()
    config = dataclasses.replace(config, kernels=dataclasses.replace(config.kernels, mark_step_per_layer=True))
    device = _LazyStub()
    model = build_model_stage(config, ParallelState.build(ParallelConfig()), device, layer_range=(0, 4),
                              dispatcher="alltoall", recompute=RecomputeConfig(), seed=1)
    model(torch.randint(0, 64, (1, 8)))
    assert device.steps == 4
    plain = build_model_stage(tiny_config(), ParallelState.build(ParallelConfig()), device, layer_range=(0, 4),
                              dispatcher="alltoall", recompute=RecomputeConfig(), seed=1)
    plain(torch.randint(0, 64, (1, 8)))
    assert device.steps == 4


class _ShapeRecorder(TorchDispatchMode):
    """(op, output shapes) of every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Tuple[str, Tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (list, tuple)) else (out,)
        self.ops.append((str(func), tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))))
        return out


def _step_shapes(config, seed: int) -> Tuple[List[Tuple[str, Tuple]], torch.Tensor]:
    """Shapes of one forward + backward of the model on a batch drawn with `seed`, and the routing."""
    from megatron.core.models.deepseek.model import DeepSeekModel

    model = DeepSeekModel(config, seed=0)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=gen)
    with _ShapeRecorder() as rec:
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        model.loss(out, torch.ones(2, 8)).backward()
    routing = torch.stack([m.last_stats.tokens_per_expert for m in model.moe_layers()])
    return rec.ops, routing


def test_padded_moe_step_has_the_same_shapes_whatever_the_routing():
    base = tiny_config()
    padded = dataclasses.replace(base, moe=dataclasses.replace(base.moe, capacity_factor=1.0, pad_to_capacity=True))
    shapes_a, routing_a = _step_shapes(padded, seed=1)
    shapes_b, routing_b = _step_shapes(padded, seed=2)
    assert not torch.equal(routing_a, routing_b), "the two batches must route differently"
    assert len(shapes_a) > 500 and shapes_a == shapes_b
    # The recorder does see data-dependent shapes (a boolean-mask selection of two different masks).
    recorded = []
    for mask in (torch.tensor([True, False, True]), torch.tensor([True, False, False])):
        with _ShapeRecorder() as rec:
            torch.arange(3)[mask]
        recorded.append(rec.ops)
    assert recorded[0] != recorded[1]


def test_timers_reach_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(RUN + ["--train-iters", "2", "--log-timers-to-tensorboard", "--timing-log-level", "1",
                    "--tensorboard-dir", str(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("forward", "backward", "optimizer", "data", "moe-dispatch", "moe-combine", "train-step"):
        assert f"timers/{name}" in tags, sorted(tags)
        assert all(e.value > 0 for e in events.Scalars(f"timers/{name}")), name
    assert "(ms per iteration) backward:" in capsys.readouterr().out
    plain = tmp_path / "plain"
    pretrain(RUN + ["--train-iters", "1", "--tensorboard-dir", str(plain)])
    quiet = EventAccumulator(str(plain))
    quiet.Reload()
    assert not [t for t in quiet.Tags()["scalars"] if t.startswith("timers/")]


def test_load_without_a_checkpoint_is_an_error_unless_asked(tmp_path, capsys):
    empty = tmp_path / "typo"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--load .*typo: no checkpoint there .* pass --allow-no-checkpoint"):
        pretrain(RUN + ["--train-iters", "1", "--load", str(empty)])
    summary = pretrain(RUN + ["--train-iters", "1", "--load", str(empty), "--allow-no-checkpoint"])
    assert summary["iteration"] == 1 and "training from scratch" in capsys.readouterr().out
    # A run restarting from its own save directory starts fresh the first time (Megatron's pattern).
    own = tmp_path / "own"
    summary = pretrain(RUN + ["--train-iters", "1", "--load", str(own), "--save", str(own), "--save-interval", "1"])
    assert summary["iteration"] == 1
    with pytest.raises(ValueError, match="no checkpoint there"):
        pretrain(RUN + ["--train-iters", "1", "--load", str(empty), "--use-checkpoint-args"])


@pytest.mark.slow
def test_use_torch_compile_trains_the_compiled_model_with_eager_losses(monkeypatch):
    """The flags reach compile_model and compiled autograd. The device layer's backend (inductor on
    CPU) is swapped for aot_eager to keep this wiring test short; inductor's own numerics are
    tested in tests/unit/core/models/test_compile.py."""
    from megatron.core.device import Device
    from megatron.core.models.deepseek.compile import is_compiled
    from megatron.training import model_builder

    monkeypatch.setattr(Device, "compile_backend", lambda self: "aot_eager")

    built = []
    real = model_builder.build_model_stage

    def keep(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    model_builder.build_model_stage = keep
    try:
        argv = RUN + ["--train-iters", "2"]
        compiled = pretrain(argv + ["--use-torch-compile", "1", "--use-torch-compiled-autograd", "1"])
        eager = pretrain(argv)
    finally:
        model_builder.build_model_stage = real
    assert is_compiled(built[0]) and not is_compiled(built[1])
    for got, want in zip(compiled["losses"], eager["losses"]):
        for key in want:
            if key not in ("iteration", "skipped"):
                assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (key, got[key], want[key])
    with pytest.raises(ValueError, match="--use-torch-compiled-autograd cannot capture"):
        parse_args(argv + ["--use-torch-compile", "1", "--use-torch-compiled-autograd", "1", "--overlap-grad-reduce"], world_size=1)


def test_a_second_job_on_the_same_save_directory_is_refused(tmp_path):
    import subprocess
    import sys

    from megatron.training.checkpointing import acquire_save_lock, release_save_lock
    from tests.conftest import REPO_ROOT

    save = tmp_path / "ckpt"
    lock = acquire_save_lock(str(save))  # this (live) process owns the directory
    try:
        argv = RUN + ["--train-iters", "1", "--save", str(save), "--save-interval", "1"]
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain_gpt.py"), *argv], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and str(save) in error[0] and f"pid {os.getpid()}" in error[0], proc.stderr[-2000:]
        assert not list(save.glob("iter_*"))
    finally:
        release_save_lock(lock)
    assert pretrain(RUN + ["--train-iters", "1", "--save", str(save), "--save-interval", "1"])["iteration"] == 1
    assert (save / "iter_0000001").is_dir()
