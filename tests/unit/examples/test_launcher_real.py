"""pretrain_deepseek.sh launches for real on 2 CPU ranks (EP2, mock data, a few iterations), with
torchrun and with mpirun. CI installs OpenMPI (`.ci/run`); where mpirun is absent that case skips."""

import re
import shutil

import pytest

from tests.unit.examples.launch_utils import launch, tiny_env


def _launch(tmp_path, launcher: str) -> str:
    # one micro-batch of 2 per rank per step (the multi-node tests run two of 1)
    rc, out = launch(tiny_env(tmp_path / f"results {launcher}", launcher,  # a space in the path must survive
                              HL_MICRO_BATCH="2", HL_GBS="4"))
    assert rc == 0, out[-4000:]
    return out


def _check_run(tmp_path, launcher: str, out: str) -> None:
    logs = out + "".join(p.read_text(errors="replace") for p in (tmp_path / f"results {launcher}").rglob("log_*.txt"))
    assert re.search(r"iteration\s+3/\s+3 \|", logs), logs[-3000:]
    ckpt = list((tmp_path / f"results {launcher}").rglob("latest_checkpointed_iteration.txt"))
    assert ckpt and ckpt[0].read_text().strip() == "3"


@pytest.mark.slow
def test_torchrun_launch_for_real(tmp_path):
    _check_run(tmp_path, "torchrun", _launch(tmp_path, "torchrun"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (CI installs openmpi-bin via .ci/run)")
def test_mpirun_launch_for_real(tmp_path):
    _check_run(tmp_path, "mpirun", _launch(tmp_path, "mpirun"))
