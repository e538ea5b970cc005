"""megatron/training/planning/launch_check.py: the launcher's pre-launch check (flags, memory plan,
nearest layouts that fit), called directly."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

import pytest

from megatron.training.planning.launch_check import (
    BAD_INPUT,
    DOES_NOT_FIT,
    FITS,
    NO_IMPORT,
    NO_PLAN,
    detect_device_type,
    device_type_from_names,
    layout_changes,
    main,
    nearest_fitting,
)

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "megatron" / "training" / "planning" / "launch_check.py"

# The quickstart's layout (scripts/quickstart.sh): tiny preset, 2 CPU ranks, EP 2, allgather, fp32.
TINY = ["--device", "cpu", "--model-preset", "tiny", "--tensor-model-parallel-size", "1",
        "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2", "--seq-length", "128",
        "--max-position-embeddings", "128", "--mtp-num-layers", "1", "--moe-token-dispatcher-type", "allgather",
        "--moe-grouped-gemm", "--optimizer", "adam", "--lr", "2e-3", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--train-iters", "10", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "4096"]
CPU2 = ["--num-devices", "2", "--devices-per-node", "2", "--device-type", "cpu"]


def check(*own: str, train: List[str] = TINY) -> Tuple[int, List[str]]:
    out = io.StringIO()
    code = main([*own, "--", *train], out=out)
    return code, out.getvalue().splitlines()


def test_fits_prints_the_plan_then_one_summary_line():
    code, lines = check(*CPU2, "--device-memory-gb", "4", "--print-plan")
    assert code == FITS
    assert any(line.startswith("stage layers") for line in lines)  # the per-stage memory table
    assert any(line.startswith("verdict: FITS") for line in lines)
    assert re.fullmatch(r"fits on CPU with 4 GB: peak \d+\.\d\d GiB on stage 0 \(.+\) vs 3\.35 GiB usable", lines[-1])
    # without --print-plan only the summary
    code, lines = check(*CPU2, "--device-memory-gb", "4")
    assert code == FITS and len(lines) == 1 and lines[0].startswith("fits on CPU")


def test_cpu_memory_is_the_hosts_ram_shared_by_the_ranks_of_a_node():
    from megatron.training.planning.devices import host_memory_bytes

    code, lines = check("--num-devices", "2", "--devices-per-node", "2", "--device-type", "cpu", "--print-plan")
    assert code == FITS
    per_rank = host_memory_bytes() / 2 / 2**30
    assert f"fits on CPU ({per_rank:.1f} GiB per rank)" in lines[-1]
    assert any(line.startswith("note: memory per rank: this host's RAM") and "shared by 2 ranks" in line
               for line in lines)


def _changes(shown: str) -> int:
    inside = re.search(r"\[(.*?)\]", shown).group(1)
    return 0 if inside == "no layout change" else len(inside.split(", "))


def test_does_not_fit_names_the_nearest_layouts_that_fit():
    code, lines = check(*CPU2, "--device-memory-gb", "0.15", "--print-plan")
    assert code == DOES_NOT_FIT
    assert any(line.startswith("verdict: DOES NOT FIT") for line in lines)
    line = lines[-1]
    head, sep, rest = line.partition("; nearest layouts that fit on 2 devices (fewest changed settings, then fastest): ")
    assert sep, line
    m = re.fullmatch(r"does not fit on CPU with 0\.15 GB: predicted peak (\d+\.\d\d) GiB on stage 0 \(.+\) "
                     r"vs (\d+\.\d\d) GiB usable", head)
    assert m and float(m.group(1)) > float(m.group(2)), head
    usable = float(m.group(2))
    shown = rest.split("; ")
    assert len(shown) == 3
    keys = []
    for item in shown:
        m = re.fullmatch(r"(TP\d.*?) \[.*\] peak (\d+\.\d\d) GiB, ([\d.e+-]+) s/step", item)
        assert m, item
        assert float(m.group(2)) <= usable  # each one fits
        keys.append((_changes(item), float(m.group(3))))
    assert keys == sorted(keys)  # fewest changes first, then the shortest step


def test_nearest_layouts_are_real_search_candidates_that_fit():
    """The named layouts, planned alone with their own flags, fit."""
    from megatron.training.arguments import parse_args
    from megatron.training.planning import plan_for_run
    from megatron.training.planning.search import search

    run = parse_args(TINY, 2, check_paths=False)
    found = search(run.model, TINY, 2, 2, lambda cmd, w: plan_for_run(parse_args(cmd, w, check_paths=False), "cpu",
                                                                      device_memory_gb=0.15))
    have = plan_for_run(run, "cpu", device_memory_gb=0.15).layout
    near = nearest_fitting(have, found, 3)
    _, lines = check(*CPU2, "--device-memory-gb", "0.15")
    assert [c.name for c, _ in near] == [item.split(" [")[0] for item in lines[-1].split(": ", 2)[2].split("; ")]
    for cand, changes in near:
        again = plan_for_run(parse_args(cand.argv, 2, check_paths=False), "cpu", device_memory_gb=0.15)
        assert again.fits and changes == layout_changes(have, again.layout)


def _lay(**kw):
    base = dict(tp=1, pp=2, ep=2, sequence_parallel=False, stage_layers=(2, 2), dispatcher="allgather",
                recompute_granularity=None, recompute_method=None, recompute_num_layers=None, recompute_modules=(),
                distributed_optimizer=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_layout_changes_counts_each_setting_once():
    have = _lay()
    assert layout_changes(have, _lay()) == []
    # SP comes with a TP change (the search turns it on with TP): one change
    assert layout_changes(have, _lay(tp=2, sequence_parallel=True)) == ["TP 1->2"]
    assert layout_changes(_lay(tp=2), _lay(tp=2, sequence_parallel=True)) == ["SP off->on"]
    # the stage split counts when PP stays
    assert layout_changes(have, _lay(pp=4, stage_layers=(1, 1, 1, 1))) == ["PP 2->4"]
    assert layout_changes(have, _lay(stage_layers=(3, 1))) == ["stages [2, 2]->[3, 1]"]
    # the dispatcher counts only where experts are split
    assert layout_changes(have, _lay(ep=1, dispatcher="alltoall")) == ["EP 2->1"]
    assert layout_changes(have, _lay(dispatcher="alltoall")) == ["dispatcher allgather->alltoall"]
    assert layout_changes(have, _lay(recompute_granularity="full", recompute_method="uniform",
                                     recompute_num_layers=1, distributed_optimizer=True)) == [
        "recompute none->full uniform 1", "distributed optimizer off->on"]
    assert layout_changes(have, _lay(recompute_granularity="selective", recompute_modules=("core_attn",))) == [
        "recompute none->selective core_attn"]


def test_nearest_is_fewest_changes_then_fastest():
    def cand(name, step, **kw):
        return SimpleNamespace(name=name, feasible=True, plan=SimpleNamespace(layout=_lay(**kw), step={"step": step}))

    have = _lay()
    pool = [
        cand("two changes, fastest", 1.0, tp=2, ep=1),
        cand("one change, slow", 9.0, pp=4, stage_layers=(1, 1, 1, 1)),
        cand("one change, fast", 3.0, dispatcher="alltoall"),
        SimpleNamespace(name="infeasible, no change", feasible=False, plan=SimpleNamespace(layout=_lay(), step={"step": 0.1})),
        cand("three changes", 0.5, tp=2, ep=1, distributed_optimizer=True),
    ]
    assert [c.name for c, _ in nearest_fitting(have, pool, 3)] == ["one change, fast", "one change, slow",
                                                                    "two changes, fastest"]
    assert len(nearest_fitting(have, pool, 2)) == 2


def test_override_asks_for_no_search():
    code, lines = check(*CPU2, "--device-memory-gb", "0.15", "--nearest", "0")
    assert code == DOES_NOT_FIT and len(lines) == 1
    assert lines[0].startswith("does not fit on CPU with 0.15 GB: predicted peak") and "nearest" not in lines[0]


@pytest.mark.parametrize("own, train, needle", [
    (["--num-devices", "2", "--device-type", "tpu"], TINY,
     "error: --device-type: unknown device type 'tpu'; choose one of gaudi2, gaudi3, h100, h200, h800, cpu"),
    ([*CPU2, "--device-memory-gb", "-1"], TINY, "error: --device-memory-gb must be a positive number, got '-1'"),
    ([*CPU2, "--device-memory-gb", "lots"], TINY, "error: --device-memory-gb must be a positive number, got 'lots'"),
    ([*CPU2], TINY + ["--tensor-model-parallel-size", "3"], "error: the training flags are invalid: world size 2"),
    (["--device-type", "cpu"], TINY, "error: the following arguments are required: --num-devices"),
])
def test_bad_input_is_one_line_and_status_1(own, train, needle):
    code, lines = check(*own, train=train)
    assert code == BAD_INPUT and len(lines) == 1 and lines[0].startswith(needle), lines


def _tool(folder: Path, name: str, output: str, status: int = 0) -> None:
    """An executable `name` in `folder` printing `output`, with shell builtins only (PATH is `folder`)."""
    path = folder / name
    words = " ".join(f"'{line}'" for line in output.splitlines())
    body = f"printf '%s\\n' {words}" if words else ":"
    path.write_text("#!/bin/sh\n" + body + f"\nexit {status}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("names, expected", [
    (["HL-225"], "gaudi2"), (["HL-325L"] * 8, "gaudi3"), (["HL-328"], "gaudi3"),
    (["NVIDIA H100 80GB HBM3"] * 8, "h100"), (["NVIDIA H100 PCIe"], "h100"), (["NVIDIA H200"], "h200"),
    (["NVIDIA H800"], "h800"),
    (["NVIDIA H100 NVL"], None), (["NVIDIA GH200 480GB"], None), (["NVIDIA A100-SXM4-80GB"], None),
    (["HL-205"], None), (["NVIDIA H100 80GB HBM3", "NVIDIA H200"], None), ([], None), (["  "], None),
])
def test_card_names_map_only_when_sure(names, expected):
    assert device_type_from_names(names) == expected


def test_detection_asks_the_tools_of_the_run_device(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_device_type("auto") == (None, "no hl-smi; no nvidia-smi")
    _tool(tmp_path, "nvidia-smi", "NVIDIA H100 80GB HBM3\nNVIDIA H100 80GB HBM3\n")
    assert detect_device_type("cuda") == ("h100", "nvidia-smi names 'NVIDIA H100 80GB HBM3'")
    assert detect_device_type("hpu") == (None, "no hl-smi")
    _tool(tmp_path, "hl-smi", "HL-325L\n")
    assert detect_device_type("auto") == ("gaudi3", "hl-smi names 'HL-325L'")  # the ranks' order: hpu first
    _tool(tmp_path, "hl-smi", "", status=1)
    assert detect_device_type("auto") == ("h100", "nvidia-smi names 'NVIDIA H100 80GB HBM3'")
    _tool(tmp_path, "nvidia-smi", "NVIDIA A100-SXM4-80GB\n")
    found, said = detect_device_type("auto")
    assert found is None and said == ("hl-smi named no card (exit status 1); nvidia-smi names "
                                      "'NVIDIA A100-SXM4-80GB', not one model the planner has figures for")


def test_detected_device_is_planned_and_unknown_means_no_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, lines = check("--num-devices", "2", "--detect", "cuda", "--print-plan")
    assert code == NO_PLAN and lines == ["no memory plan: the device model is unknown (no nvidia-smi)"]
    _tool(tmp_path, "nvidia-smi", "NVIDIA H200\nNVIDIA H200\n")
    code, lines = check("--num-devices", "2", "--detect", "cuda", "--print-plan")
    assert code == FITS and lines[-1].startswith("fits on NVIDIA H200 SXM (141 GB): peak")
    assert "note: device type h200: nvidia-smi names 'NVIDIA H200'" in lines
    # the flags are still validated without a plan
    code, lines = check("--num-devices", "2", "--detect", "hpu", train=TINY + ["--tensor-model-parallel-size", "3"])
    assert code == BAD_INPUT and lines[0].startswith("error: the training flags are invalid")


def test_run_as_a_file_and_without_the_project(tmp_path):
    """The launcher runs the file by path: exit statuses survive, and a Python that cannot import
    the project (here: no site-packages, so no torch) is status 2 with one line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *CPU2, "--device-memory-gb", "0.15", "--nearest", "0", "--",
                           *TINY], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == DOES_NOT_FIT and proc.stdout.startswith("does not fit on CPU"), proc.stderr
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), *CPU2, "--", *TINY], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == NO_IMPORT, proc.stderr
    assert proc.stdout.startswith("error: cannot import this project: ") and len(proc.stdout.splitlines()) == 1



def _checkpoint(root: Path, argv: List[str]) -> Path:
    """A save folder as far as --use-checkpoint-args reads it: tracker and common.json with the run's arguments."""
    import json

    from megatron.training.arguments import parse_args
    from megatron.training.checkpoint_format import FORMAT
    from megatron.training.config import to_flat_dict

    (root / "iter_0000007").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    args = to_flat_dict(parse_args(argv, 2, check_paths=False))
    (root / "iter_0000007" / "common.json").write_text(json.dumps({"format": FORMAT, "iteration": 7, "args": args}))
    return root


def test_the_model_of_a_checkpoint_is_planned(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", TINY + ["--num-layers", "6", "--moe-layer-freq", "([0]*1+[1]*5)"])
    resume = TINY + ["--load", str(ckpt), "--use-checkpoint-args"]
    code, lines = check(*CPU2, "--device-memory-gb", "4", "--print-plan", train=resume)
    assert code == FITS, lines
    row = lines[lines.index(next(line for line in lines if line.startswith("stage layers"))) + 1]
    assert re.match(r"\s+0\s+0-5\s", row), row  # the checkpoint's 6 layers, not the preset's 4
    # a size given on the command line that contradicts the checkpoint: the ranks reject it, no plan here
    code, lines = check(*CPU2, "--device-memory-gb", "4", train=resume + ["--num-layers", "4"])
    assert code == NO_PLAN and len(lines) == 1
    assert lines[0].startswith("no memory plan: the checkpoint's model arguments do not apply (ValueError: ")
    # a folder whose common.json does not read as a checkpoint's: no plan either, saying why
    (ckpt / "iter_0000007" / "common.json").write_text('{"iteration": 7}')
    code, lines = check(*CPU2, "--device-memory-gb", "4", train=resume)
    assert code == NO_PLAN and lines[0].startswith(f"no memory plan: the checkpoint arguments in {ckpt} cannot be read")
