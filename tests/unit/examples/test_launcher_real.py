"""pretrain_deepseek.sh launches for real on 2 CPU ranks (EP2, mock data, a few iterations), with
torchrun and with mpirun. CI installs OpenMPI (`.ci/run`); where mpirun is absent that case skips."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "examples" / "deepseek" / "pretrain_deepseek.sh"


def _env(tmp_path: Path, launcher: str) -> dict:
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HL_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        HL_LAUNCHER_TYPE=launcher,
        HL_DEVICE="cpu",
        HL_PYTHON=sys.executable,
        HL_TORCHRUN=str(venv_bin / "torchrun"),
        HL_NUM_NODES="1",
        HL_DEVICES_PER_NODE="2",
        HL_DP="2",
        HL_TP="1",
        HL_PP="1",
        HL_EP="2",
        HL_MODEL="tiny",
        HL_MTP_NUM_LAYERS="1",
        HL_DTYPE="fp32",
        HL_SEQ_LEN="32",
        HL_MICRO_BATCH="2",
        HL_GBS="4",
        HL_TRAIN_ITERS="3",
        HL_LR_WARMUP_ITERS="0",
        HL_LOG_INTERVAL="1",
        HL_EVAL_INTERVAL="1000",
        HL_EVAL_ITERS="1",
        HL_MOCK_DATA="1",
        HL_TOKENIZER_TYPE="NullTokenizer",
        HL_VOCAB_SIZE="1000",
        HL_TOKEN_DISPATCHER_TYPE="alltoall",
        HL_NUM_WORKERS="0",
        HL_SAVE="1",
        HL_RESULTS_DIR=str(tmp_path / f"results {launcher}"),  # a space in the path must survive
        HL_ENV_FLAGS="OMP_NUM_THREADS=1",
        HL_MASTER_PORT=str(free_port()),
    )
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def _launch(tmp_path: Path, launcher: str) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=_env(tmp_path, launcher), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _check_run(tmp_path: Path, launcher: str, out: str) -> None:
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
