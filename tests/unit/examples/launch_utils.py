"""Helpers for the tests that run examples/deepseek/pretrain_deepseek.sh for real on CPU ranks:
a tiny-model environment, launching, per-iteration losses from the log, and a scan for processes
left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "examples" / "deepseek" / "pretrain_deepseek.sh"
RSH_AGENT = REPO / "scripts" / "local_rsh_agent.sh"


def launcher_text() -> str:
    """The launcher's source: pretrain_deepseek.sh and the parts it sources from launcher/."""
    parts = sorted((SCRIPT.parent / "launcher").glob("*.sh"))
    return "\n".join(p.read_text() for p in [SCRIPT, *parts])

_LAUNCHER_VARS = ("HL_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_", "PMI_", "TORCHELASTIC_", "ENV_FLAGS")


def tiny_env(results: Path, launcher: str, nodes: int = 1, per_node: int = 2, **overrides: str) -> Dict[str, str]:
    """HL_* settings for a tiny DeepSeek model on CPU: DP = EP = all ranks, mock data, 3 iterations
    of sequence length 32, fp32, MTP on, alltoall dispatcher."""
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    world = nodes * per_node
    env.update(
        HL_LAUNCHER_TYPE=launcher,
        HL_DEVICE="cpu",
        HL_PYTHON=sys.executable,
        HL_TORCHRUN=str(venv_bin / "torchrun"),
        HL_NUM_NODES=str(nodes),
        HL_DEVICES_PER_NODE=str(per_node),
        HL_DP=str(world),
        HL_TP="1",
        HL_PP="1",
        HL_EP=str(world),
        HL_MODEL="tiny",
        HL_MTP_NUM_LAYERS="1",
        HL_DTYPE="fp32",
        HL_SEQ_LEN="32",
        HL_MICRO_BATCH="1",
        HL_GBS=str(2 * world),
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
        HL_RESULTS_DIR=str(results),
        HL_ENV_FLAGS="OMP_NUM_THREADS=1",
        HL_MASTER_PORT=str(free_port()),
    )
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env.update(overrides)
    return env


def launch(env: Dict[str, str], timeout: int = 600) -> Tuple[int, str]:
    """Run the launcher to the end; (exit status, stdout + stderr)."""
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _terminal_signals() -> None:
    # A terminal's foreground job starts with the default SIGINT / SIGQUIT handling. A test run
    # started in the background of a non-interactive shell (nohup ... &) ignores them, and a shell
    # cannot trap a signal that was ignored when it started.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def start(env: Dict[str, str], output: Path) -> subprocess.Popen:
    """Start the launcher in a process group of its own (as a shell starts a foreground job), its
    output going to `output`."""
    with open(output, "w") as out:
        return subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_terminal_signals)


def wait_for(output: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `pattern` (a regex) appears in the output file; fail if the launcher exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, output.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {pattern!r}:\n"
                                 + output.read_text(errors="replace")[-4000:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + output.read_text(errors="replace")[-4000:])


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_FIELDS = ("lm loss", "mtp_1 loss", "grad norm")


def iteration_losses(text: str) -> List[Tuple[int, Dict[str, str]]]:
    """Per logged iteration: its number and the printed lm loss, MTP loss and grad norm (as text)."""
    rows = []
    for m in _ITERATION.finditer(text):
        fields = dict(part.strip().split(": ", 1) for part in m.group(2).split("|") if ": " in part)
        rows.append((int(m.group(1)), {k: fields.get(k) for k in _FIELDS}))
    return rows


def processes_mentioning(text: str) -> List[str]:
    """Command lines of running processes (other than this one) that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def no_processes_left(text: str, timeout: float = 10) -> List[str]:
    """Processes mentioning `text` that are still there after `timeout` seconds (none expected)."""
    deadline = time.monotonic() + timeout
    left = processes_mentioning(text)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_mentioning(text)
    return left


def latest_checkpoint(results: Path) -> Optional[int]:
    tracker = results / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text().strip()) if tracker.exists() else None
