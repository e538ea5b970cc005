"""Stopping pretrain_deepseek.sh: Ctrl-C (SIGINT to the launcher's process group, as a terminal
sends it) or SIGTERM (to the launcher alone, as a scheduler sends it) stops every rank, with no
process left behind; with HL_EXIT_SIGNAL_HANDLER=1 the ranks first save a checkpoint at the
iteration they are in. Real CPU runs of the tiny model (mock data, sequence length 32)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from tests.unit.examples.launch_utils import (
    RSH_AGENT,
    latest_checkpoint,
    no_processes_left,
    start,
    tiny_env,
    wait_for,
)

TRAIN_ITERS = 2000  # far more than the test waits for: only the signal ends these runs


def _stop(tmp_path, env, how: str, expected_rc: int):
    output = tmp_path / "console.txt"
    proc = start(env, output)
    try:
        wait_for(output, r"iteration\s+2/", proc)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = output.read_text(errors="replace")
    assert rc == expected_rc, out[-4000:]
    assert no_processes_left(env["HL_RESULTS_DIR"]) == [], out[-4000:]
    return out


@pytest.mark.slow
def test_ctrl_c_saves_then_stops_every_rank(tmp_path):
    results = tmp_path / "results"
    env = tiny_env(results, "torchrun", HL_TRAIN_ITERS=str(TRAIN_ITERS), HL_EXIT_SIGNAL_HANDLER="1",
                   HL_SHUTDOWN_TIMEOUT="60")
    out = _stop(tmp_path, env, "ctrl-c", 130)
    saved = latest_checkpoint(results)
    assert saved is not None and 2 <= saved < TRAIN_ITERS, out[-4000:]
    assert re.search(rf"exiting at iteration {saved}: signal SIGTERM received \(--exit-signal-handler\)", out), out[-4000:]
    assert "stopped: signal SIGTERM received (--exit-signal-handler)" in out  # the end-of-run summary says why
    assert "SIGINT: stopping every rank; they save a checkpoint first" in out
    assert "SignalException" not in out  # torchrun's traceback for the stop goes to the log only
    assert "SignalException" in (results / "logs" / "launcher_stderr.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (CI installs openmpi-bin via .ci/run)")
def test_sigterm_two_hosts_mpirun_saves_then_stops_every_rank(tmp_path):
    results = tmp_path / "results"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    env = tiny_env(results, "mpirun", nodes=2, per_node=2, HL_HOSTSFILE=str(hosts),
                   OMPI_MCA_plm_rsh_agent=str(RSH_AGENT), HL_TRAIN_ITERS=str(TRAIN_ITERS),
                   HL_EXIT_SIGNAL_HANDLER="1", HL_SHUTDOWN_TIMEOUT="5")
    out = _stop(tmp_path, env, "sigterm", 143)
    saved = latest_checkpoint(results)
    assert saved is not None and 2 <= saved < TRAIN_ITERS, out[-4000:]
    assert re.search(rf"exiting at iteration {saved}: signal SIGTERM received \(--exit-signal-handler\)", out), out[-4000:]
    assert "stopped: signal SIGTERM received (--exit-signal-handler)" in out  # the end-of-run summary says why
    # the orted started for 127.0.0.2 is gone too
    assert no_processes_left(f"plm_rsh_agent \"{RSH_AGENT}\"") == []


@pytest.mark.slow
def test_sigterm_without_handler_stops_every_rank_at_once(tmp_path):
    results = tmp_path / "results"
    env = tiny_env(results, "torchrun", HL_TRAIN_ITERS=str(TRAIN_ITERS))
    out = _stop(tmp_path, env, "sigterm", 143)
    assert latest_checkpoint(results) is None, out[-4000:]
    assert "SIGTERM: stopping every rank (HL_EXIT_SIGNAL_HANDLER=1 would save a checkpoint first)" in out
