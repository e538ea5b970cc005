"""pretrain_deepseek.sh on two "nodes" of one machine, for real (tiny model, mock data, 3 iterations
of sequence length 32, fp32, CPU ranks):

- torchrun multi-node: two launcher processes, HL_TORCHRUN_NODE_RANK 0 and 1, master 127.0.0.1;
- mpirun: a hostfile with 127.0.0.1 and 127.0.0.2 (2 slots each); mpirun starts the second host's
  daemon through scripts/local_rsh_agent.sh (OMPI_MCA_plm_rsh_agent), which runs it locally.

4 ranks, 2 per node, DP 4 x EP 4: with TP 1 and PP 1 the expert grid of the single stage is all
four ranks (rank = tp + TP * (dp + DP * pp)), so each MoE layer's all-to-all crosses the nodes.
The per-iteration losses and gradient norms printed in the log must equal those of a one-node run
of the same layout. CI installs OpenMPI (`.ci/run`); where mpirun is absent its cases skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.examples.launch_utils import (
    RSH_AGENT,
    SCRIPT,
    iteration_losses,
    latest_checkpoint,
    launch,
    no_processes_left,
    tiny_env,
)

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="mpirun not installed (CI installs openmpi-bin via .ci/run)")


def _check_three_iterations(out: str, results: Path) -> list:
    rows = iteration_losses(out)
    assert [i for i, _ in rows] == [1, 2, 3], out[-4000:]
    assert all(v is not None for _, fields in rows for v in fields.values()), rows
    assert latest_checkpoint(results) == 3
    return rows


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory):
    """The reference: the same 4-rank layout on one node (torchrun, 4 processes)."""
    results = tmp_path_factory.mktemp("one_node") / "results"
    rc, out = launch(tiny_env(results, "torchrun", nodes=1, per_node=4))
    assert rc == 0, out[-4000:]
    return _check_three_iterations(out, results)


@pytest.mark.slow
def test_torchrun_two_nodes_equal_one_node(tmp_path, one_node_losses):
    results = tmp_path / "shared results"
    env = tiny_env(results, "torchrun", nodes=2, per_node=2, HL_TORCHRUN_MULTINODE="1",
                   HL_TORCHRUN_MASTER_ADDR="127.0.0.1")
    node1 = subprocess.Popen(["bash", str(SCRIPT)], env={**env, "HL_TORCHRUN_NODE_RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rc0, out0 = launch({**env, "HL_TORCHRUN_NODE_RANK": "0"})
        out1, _ = node1.communicate(timeout=300)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert rc0 == 0, out0[-4000:]
    assert node1.returncode == 0, out1[-4000:]
    # global rank 0 (on node 0) logs the iterations; node 1 runs ranks 2 and 3
    assert _check_three_iterations(out0, results) == one_node_losses
    assert iteration_losses(out1) == []
    logs = results / "logs"
    assert len(list(logs.rglob("stdout.log"))) == 4  # two local ranks per node, each node's torchrun


@pytest.mark.slow
@needs_mpirun
def test_mpirun_two_hosts_equal_one_node(tmp_path, one_node_losses):
    results = tmp_path / "results"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    # the agent is wrapped to record which hosts mpirun reached through it
    calls = tmp_path / "agent_calls"
    agent = tmp_path / "agent.sh"
    agent.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{RSH_AGENT}" "$@"\n')
    agent.chmod(0o755)
    env = tiny_env(results, "mpirun", nodes=2, per_node=2, HL_HOSTSFILE=str(hosts),
                   OMPI_MCA_plm_rsh_agent=str(agent))
    rc, out = launch(env)
    assert rc == 0, out[-4000:]
    assert _check_three_iterations(out, results) == one_node_losses
    # the second host's daemon was started through the agent, with ranks 2 and 3 under it
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and " 127.0.0.2 " in f" {lines[0]} " and "orted" in lines[0], lines
    assert sorted(p.parent.name for p in (results / "logs").rglob("stdout")) == [f"rank.{r}" for r in range(4)]


# ------------------------------------------------------------------ user error inside the ranks


def _user_error_case(results: Path, launcher: str, **extra: str):
    # MoE with TP 2 but without sequence parallelism; HL_PRECHECK=0 lets the ranks meet it
    env = tiny_env(results, launcher, HL_PRECHECK="0", HL_TP="2", HL_DP="2", HL_EP="2", HL_GBS="4",
                   HL_SEQ_PARALLEL="0", **extra)
    if launcher == "torchrun":
        env.update(HL_DEVICES_PER_NODE="4")
    return launch(env)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpirun", marks=needs_mpirun)])
def test_user_error_in_ranks_is_one_line(tmp_path, launcher):
    results = tmp_path / "results"
    extra = {"HL_REDIRECT_LOGS": "1"}  # the console copy in the results folder gets the same one line
    if launcher == "mpirun":
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
        extra.update(HL_NUM_NODES="2", HL_DEVICES_PER_NODE="2", HL_HOSTSFILE=str(hosts),
                     OMPI_MCA_plm_rsh_agent=str(RSH_AGENT))
    rc, out = _user_error_case(results, launcher, **extra)
    assert rc == 2, out[-4000:]
    errors = [line for line in out.splitlines() if "error:" in line or "Error" in line]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: ") and "sequence-parallel" in errors[0]
    assert f"(per-rank logs: {results / 'logs'})" in errors[0]
    for noise in ("Traceback", "ChildFailedError", "Primary job", "mpirun detected"):
        assert noise not in out, out[-4000:]
    assert "sequence-parallel" in (results / "logs" / "error.txt").read_text()
    # what the console did not show is kept: the tool's report in launcher_stderr.log
    assert (results / "logs" / "launcher_stderr.log").read_text().count("error: ") >= 1
    console_copy = list(results.glob("log_*.txt"))
    assert len(console_copy) == 1
    copied = console_copy[0].read_text()
    assert [line for line in copied.splitlines() if "error:" in line or "Error" in line] == errors
    assert "Traceback" not in copied
    assert no_processes_left(str(results)) == []
