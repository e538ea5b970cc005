"""A process SIGKILLed at each step of a checkpoint save leaves a loadable previous checkpoint, and
the next save cleans up after it. Unlike test_checkpointing's simulated crash, the child process
is really killed (no exception handlers, no `finally`), at deterministic points of the save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.training import checkpointing as ckpt
from tests.unit.training import checkpoint_testlib as T  # the same functions as the child

HERE = Path(__file__).resolve().parent

# The child: train 2 steps, save iteration 2, record those weights, train 1 more step, then save
# iteration `target` with a hook that SIGKILLs the process at `point`.
CHILD = r"""
import os, signal, sys
import torch
from megatron.training import checkpoint_format as fmt
from megatron.training import checkpoint_io as io
from megatron.training import checkpointing as ckpt
from tests.unit.training import checkpoint_testlib as T

root, point, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, opt, state = T.build()
T.train_steps(model, opt, range(1))
T.save(root, 2, model, opt, state)
torch.save(T.snapshot(model), os.path.join(root, "..", "weights_at_2.pt"))
T.train_steps(model, opt, range(1, 2))

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_write, real_feed = os.replace, io.atomic_write_text, fmt.DataFileWriter._feed

def feed(self, view):               # half of the data file written
    if point == "data" and self.bytes > 0:
        die()
    return real_feed(self, view)

def write(path, text):
    name = os.path.basename(path)
    if (point == "index" and name == fmt.INDEX_NAME) or (point == "common" and name == io.COMMON_NAME) \
            or (point == "tracker" and name == ckpt.TRACKER_NAME):
        die()
    return real_write(path, text)

def replace(src, dst):
    src, dst = str(src), str(dst)
    if point == "rename" and ".tmp-" in src and os.path.basename(dst).startswith("iter_"):
        die()
    out = real_replace(src, dst)
    if point == "resave_window" and ".tmp-old-" in dst:
        die()                       # old iter_N moved aside, new one not yet in place
    return out

fmt.DataFileWriter._feed = feed
io.atomic_write_text = write
os.replace = replace
T.save(root, target, model, opt, state)
print("save finished: the kill point was never reached", flush=True)
"""


@pytest.mark.parametrize(
    "point,target",
    [("data", 4), ("index", 4), ("common", 4), ("rename", 4), ("tracker", 4), ("resave_window", 2)],
)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path, point: str, target: int) -> None:
    root = tmp_path / "save"
    root.mkdir()
    repo = HERE.parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), point, str(target)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, f"child exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"

    expected = torch.load(tmp_path / "weights_at_2.pt", weights_only=True)
    assert ckpt.read_tracker(str(root)) == 2
    assert ckpt.verify_checkpoint(str(root))["iteration"] == 2
    fresh, fopt, fstate = T.build(seed=5)
    assert ckpt.load_checkpoint(str(root), [fresh], fopt, None, fstate)["iteration"] == 2
    T.states_equal(T.snapshot(fresh), expected)

    # The next save (a restarted run) cleans up and leaves only complete checkpoints.
    T.save(root, 6, fresh, fopt, fstate)
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    assert ckpt.read_tracker(str(root)) == 6
    assert "iter_0000002" in names  # the previous checkpoint survives (moved back after resave_window)
    again, aopt, astate = T.build(seed=9)
    assert ckpt.load_checkpoint(str(root / "iter_0000002"), [again], aopt, None, astate)["iteration"] == 2
    T.states_equal(T.snapshot(again), expected)
