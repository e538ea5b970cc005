"""pretrain_gpt.py, the entry point every rank runs: a user error (ValueError, FileNotFoundError,
CheckpointError from pretrain) is one line `error: <message>` from rank 0 and exit status 2;
anything else keeps its traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.training.checkpoint_io import CheckpointError

ROOT = Path(__file__).resolve().parents[3]
ENTRY = ROOT / "pretrain_gpt.py"


@pytest.fixture(scope="module")
def entry():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_entry", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raising(error: BaseException):
    def train(argv):
        raise error

    return train


@pytest.mark.parametrize("env, rank", [
    ({}, 0),
    ({"RANK": "3"}, 3),
    ({"OMPI_COMM_WORLD_RANK": "5"}, 5),
    ({"PMI_RANK": "7"}, 7),
    ({"RANK": "1", "OMPI_COMM_WORLD_RANK": "2"}, 1),  # torchrun's variable first
    ({"RANK": "", "PMI_RANK": "2"}, 2),
])
def test_launcher_rank(entry, env, rank):
    assert entry.launcher_rank(env) == rank


@pytest.mark.parametrize("error", [
    ValueError("--num-experts (6) must be divisible by --expert-model-parallel-size (4)"),
    FileNotFoundError(2, "No such file or directory", "/data/corpus.bin"),
    CheckpointError("/ckpt/iter_0000010: metadata missing"),
])
def test_user_error_is_one_line_from_rank_0(entry, capsys, error):
    assert entry.main(train=_raising(error), env={"RANK": "0"}, grace_s=30) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {error}\n"


def test_multi_line_message_becomes_one_line(entry, capsys):
    assert entry.main(train=_raising(ValueError("first\n  second\n")), env={}) == 2
    assert capsys.readouterr().err == "error: first second\n"


def test_other_ranks_wait_before_reporting(entry, capsys):
    """Another rank gives rank 0 the time to report (the launcher stops it meanwhile); a rank
    still alive after the grace time reports its own error."""
    t0 = time.monotonic()
    assert entry.main(train=_raising(ValueError("only on my node")), env={"RANK": "2"}, grace_s=0.5) == 2
    assert time.monotonic() - t0 >= 0.5
    assert capsys.readouterr().err == "error: only on my node\n"


def test_other_errors_keep_their_traceback(entry):
    with pytest.raises(RuntimeError, match="a real crash"):
        entry.main(train=_raising(RuntimeError("a real crash")), env={})
    with pytest.raises(KeyboardInterrupt):
        entry.main(train=_raising(KeyboardInterrupt()), env={})


def test_success_is_status_0(entry):
    seen = []
    assert entry.main(train=seen.append, argv=["--x"], env={}) == 0
    assert seen == [["--x"]]


@pytest.mark.slow
def test_bad_flag_through_the_real_entry_point(tmp_path):
    """`python pretrain_gpt.py <bad flag>`: exit 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, str(ENTRY), "--model-preset", "tiny", "--no-such-flag"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-flag" in lines[0], proc.stderr
    assert proc.stdout == ""
