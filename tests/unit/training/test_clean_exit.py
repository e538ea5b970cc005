"""A finished run frees its process groups before the interpreter shuts down.

gloo runs each group's collectives on worker threads that are joined only when the group object is
freed. A group still alive at interpreter shutdown leaves those threads running while Python
finalises; a worker that drops its last collective's tensors then needs the GIL, and the rank
aborts with "terminate called without an active exception" after a successful run (seen under
load, as a launcher failure at the very end). Two things kept groups alive: the gradient hooks'
reference cycle through autograd (parameter -> hook -> DDP -> groups), and torch.distributed.nn
binding the world group as a default argument when first imported after the group exists.

The check counts gloo's threads (Linux names them pt_gloo_runloop / gloo_tcp_loop).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training.training import pretrain
from tests.dist_utils import free_port
from tests.unit.training.test_resume_and_hf_training import TINY

REPO = Path(__file__).resolve().parents[3]
TASKS = Path("/proc/self/task")

pytestmark = pytest.mark.skipif(not TASKS.is_dir(), reason="thread names are read from /proc (Linux)")

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def gloo_threads() -> int:
    count = 0
    for task in os.listdir(TASKS):
        try:
            count += (TASKS / task / "comm").read_text().strip() in GLOO_THREADS
        except FileNotFoundError:  # the thread ended while listing
            pass
    return count


def _argv(save: Path, *extra: str) -> list:
    return [*TINY, "--mock-data", "--lr", "1e-3", "--train-iters", "2", "--eval-interval", "1000",
            "--eval-iters", "0", "--save", str(save), "--save-interval", "2", *extra]


def test_single_process_run_leaves_no_gloo_threads(tmp_path):
    before = gloo_threads()
    pretrain(_argv(tmp_path / "ckpt", "--use-distributed-optimizer", "--overlap-grad-reduce"))
    assert gloo_threads() == before


_RANK_SCRIPT = """
import sys
from megatron.training.training import pretrain
from tests.unit.training.test_clean_exit import _argv, gloo_threads
pretrain(_argv(sys.argv[1], *sys.argv[2:]))
print("gloo threads after pretrain:", gloo_threads(), flush=True)
"""


@pytest.mark.slow
def test_torchrun_ranks_leave_no_gloo_threads(tmp_path):
    """Two ranks (EP 2, distributed optimizer) in fresh processes, as the launcher runs them."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path / "ckpt"), "--expert-model-parallel-size", "2", "--use-distributed-optimizer"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    counts = [line.rsplit(":", 1)[1].strip() for line in text.splitlines() if "gloo threads after pretrain:" in line]
    assert counts == ["0", "0"], text[-4000:]
