"""pretrain_deepseek.sh and the memory plan: a dry run prints it, a launch of a layout predicted not
to fit stops before anything starts (naming the nearest layouts that fit), HL_PLAN_OVERRIDE=1 lets
it through. Launches use a stub in place of torchrun, so nothing is trained."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "deepseek" / "pretrain_deepseek.sh"
QUICKSTART = ROOT / "scripts" / "quickstart.sh"
README = ROOT / "examples" / "deepseek" / "README.md"
NEAREST = "nearest layouts that fit on 2 devices (fewest changed settings, then fastest): "


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr
        self.lines = self.out.splitlines()
        self.tokens: List[str] = []
        if "# command" in self.lines:
            self.tokens = shlex.split(self.lines[self.lines.index("# command") + 1])

    @property
    def plan(self) -> List[str]:
        """The lines after `# plan` (a dry run's last section)."""
        assert "# plan" in self.lines, self.out
        return self.lines[self.lines.index("# plan") + 1:]

    def error_lines(self) -> List[str]:
        return [line for line in self.err.splitlines() if "error" in line]


def _env(tmp_path: Path, overrides: Optional[Dict[str, Optional[str]]]) -> Dict[str, str]:
    """The quickstart's layout (2 CPU ranks, torchrun, EP 2, tiny, fp32), mock data, a 4096-token vocabulary."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "HL_PYTHON": sys.executable,
           "HL_RESULTS_DIR_PREFIX": str(tmp_path / "res"), "HL_LAUNCHER_TYPE": "torchrun", "HL_DEVICE": "cpu",
           "HL_DEVICES_PER_NODE": "2", "HL_DP": "2", "HL_TP": "1", "HL_PP": "1", "HL_EP": "2", "HL_MODEL": "tiny",
           "HL_MTP_NUM_LAYERS": "1", "HL_DTYPE": "fp32", "HL_SEQ_LEN": "128", "HL_MICRO_BATCH": "4", "HL_GBS": "8",
           "HL_TOKEN_DISPATCHER_TYPE": "allgather", "HL_USE_DISTRIBUTED_OPTIMIZER": "0", "HL_MOCK_DATA": "1",
           "HL_TOKENIZER_TYPE": "NullTokenizer", "HL_VOCAB_SIZE": "4096", "HL_NUM_WORKERS": "0"}
    for k, v in (overrides or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def dry_run(tmp_path: Path, env: Optional[Dict[str, Optional[str]]] = None) -> Run:
    full = _env(tmp_path, {"HL_DRY_RUN": "1", **(env or {})})
    return Run(subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=300))


def stub_launch(tmp_path: Path, env: Optional[Dict[str, Optional[str]]] = None) -> Run:
    """A real launch (HL_DRY_RUN=0) whose torchrun is a stub recording its arguments in tmp_path/launched."""
    stub = tmp_path / "torchrun-stub"
    stub.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{tmp_path / 'launched'}'\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    full = _env(tmp_path, {"HL_TORCHRUN": str(stub), "HL_RESULTS_DIR": str(tmp_path / "results"), **(env or {})})
    return Run(subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=300))


def test_dry_run_prints_the_plan_after_the_command(tmp_path):
    r = dry_run(tmp_path)
    assert r.rc == 0 and r.err == "", r.err
    assert r.tokens and r.lines.index("# plan") > r.lines.index("# command")
    plan = r.plan
    header = next(i for i, line in enumerate(plan) if line.startswith("stage layers"))
    assert re.match(r"\s+0\s+0-3\s", plan[header + 1])  # the one stage of the tiny model, layers 0-3
    assert plan[header + 1].endswith("yes")
    assert any(line.startswith("verdict: FITS: peak") for line in plan)
    assert re.fullmatch(r"memory check: fits on CPU \(\d+\.\d GiB per rank\): peak .* GiB usable", plan[-1])


def test_quickstart_dry_run_shows_a_plan_that_fits(tmp_path):
    venv = os.path.relpath(Path(sys.executable).parents[1], ROOT)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "VENV": venv, "QUICKSTART_DRY_RUN": "1", "QUICKSTART_OUT": str(tmp_path / "qs")}
    r = Run(subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=300))
    assert r.rc == 0, r.err
    assert "--model-preset" in r.tokens and any(line.startswith("verdict: FITS") for line in r.plan)
    assert r.plan[-1].startswith("memory check: fits on CPU")


def test_a_layout_that_does_not_fit_stops_a_launch_before_it_starts(tmp_path):
    r = stub_launch(tmp_path, {"HL_PLAN_DEVICE_MEMORY_GB": "0.15"})
    assert r.rc != 0 and not (tmp_path / "launched").exists()
    assert not (tmp_path / "results").exists()  # nothing was created either
    [line] = r.error_lines()
    assert line.startswith("pretrain_deepseek.sh: error: the layout does not fit on CPU with 0.15 GB: predicted peak ")
    assert " GiB usable; " + NEAREST in line and line.endswith("; HL_PLAN_OVERRIDE=1 launches it anyway")
    named = line.split(NEAREST)[1].split("; HL_PLAN_OVERRIDE=1")[0].split("; ")
    assert len(named) == 3 and all(re.match(r"TP\d.* \[.+\] peak \d+\.\d\d GiB, \S+ s/step$", n) for n in named)


def test_override_launches_anyway_with_one_warning(tmp_path):
    r = stub_launch(tmp_path, {"HL_PLAN_DEVICE_MEMORY_GB": "0.15", "HL_PLAN_OVERRIDE": "1"})
    assert r.rc == 0, r.err
    args = (tmp_path / "launched").read_text().splitlines()
    assert args[args.index("--expert-model-parallel-size") + 1] == "2"
    warnings = [line for line in r.err.splitlines() if "warning" in line]
    assert warnings == [line for line in r.err.splitlines() if line.startswith("pretrain_deepseek.sh:")]
    [warning] = warnings
    assert warning.startswith("pretrain_deepseek.sh: warning: HL_PLAN_OVERRIDE=1: launching although the layout "
                              "does not fit on CPU with 0.15 GB: predicted peak ")
    assert r.error_lines() == []


def test_a_launch_that_fits_says_so_and_starts(tmp_path):
    r = stub_launch(tmp_path)
    assert r.rc == 0, r.err
    assert (tmp_path / "launched").exists()
    assert any(line.startswith("# memory check: fits on CPU") for line in r.lines)


def test_dry_run_reports_the_refusal_and_hl_precheck_applies_it(tmp_path):
    # a dry run reports what a launch would do
    r = dry_run(tmp_path, {"HL_PLAN_DEVICE_MEMORY_GB": "0.15"})
    assert r.rc == 0 and r.tokens, r.err
    assert any(line.startswith("verdict: DOES NOT FIT") for line in r.plan)
    assert r.plan[-1].startswith("a launch stops here: the layout does not fit on CPU with 0.15 GB: predicted peak ")
    assert NEAREST in r.plan[-1]
    # HL_PRECHECK=1: the dry run stops as the launch would, with the same line
    strict = dry_run(tmp_path, {"HL_PLAN_DEVICE_MEMORY_GB": "0.15", "HL_PRECHECK": "1"})
    assert strict.rc != 0 and strict.tokens == []
    [line] = strict.error_lines()
    assert line == "pretrain_deepseek.sh: error: " + r.plan[-1][len("a launch stops here: "):]
    # HL_PLAN_OVERRIDE=1 lets it through, with one warning
    over = dry_run(tmp_path, {"HL_PLAN_DEVICE_MEMORY_GB": "0.15", "HL_PRECHECK": "1", "HL_PLAN_OVERRIDE": "1"})
    assert over.rc == 0 and over.tokens
    assert [line for line in over.err.splitlines() if line] == [
        line for line in over.err.splitlines() if line.startswith("pretrain_deepseek.sh: warning: HL_PLAN_OVERRIDE=1")]
    assert len(over.err.splitlines()) == 1


def _readme_example() -> Dict[str, str]:
    """The HL_* settings of the example under "Before a launch" in the README, and its refusal line."""
    text = README.read_text()
    section = text[text.index("### Before a launch: the launcher's memory check"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    settings = dict(re.findall(r"\b(HL_[A-Z0-9_]+)=(\S+)", block))
    refusal = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return {**settings, "refusal": " ".join(refusal.split("\n")).strip()}


def test_a_large_preset_on_8_h100_as_the_readme_shows(tmp_path):
    """DeepSeek-V2-Lite, EP 8, on 8 H100: fits with full recompute (the README's example; the docs
    test runs it), refused without it with the line the README shows."""
    example = _readme_example()
    refusal = example.pop("refusal")
    assert example.pop("HL_CKP_ACT") == "1" and example["HL_PLAN_DEVICE_TYPE"] == "h100"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "HL_PYTHON": sys.executable,
           "HL_RESULTS_DIR_PREFIX": str(tmp_path / "res"), "HL_PRECHECK": "1", **example}
    r = Run(subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300))
    assert r.rc != 0 and r.tokens == []
    assert r.error_lines() == [refusal]
    assert "[recompute none->full uniform 1]" in refusal  # one change away: full recompute


@pytest.mark.parametrize("env, needle", [
    ({"HL_PLAN_DEVICE_TYPE": "tpu"},
     "HL_PLAN_DEVICE_TYPE: unknown device type 'tpu'; choose one of gaudi2, gaudi3, h100, h200, h800, cpu"),
    ({"HL_PLAN_DEVICE_MEMORY_GB": "0"}, "HL_PLAN_DEVICE_MEMORY_GB must be a positive number, got '0'"),
    ({"HL_PLAN_OVERRIDE": "yes"}, "HL_PLAN_OVERRIDE must be 0 or 1, got 'yes'"),
])
def test_bad_plan_settings_are_one_line_errors(tmp_path, env, needle):
    r = dry_run(tmp_path, env)
    assert r.rc != 0 and r.tokens == []
    assert r.error_lines() == [f"pretrain_deepseek.sh: error: {needle}"]


def _tools(tmp_path: Path, **names: str) -> str:
    """A PATH whose first folder holds stand-ins for vendor tools printing the given card name."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix="tools"))
    for tool, name in names.items():
        path = folder / tool.replace("_", "-")
        path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{name}' '{name}'\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f"{folder}:/usr/local/bin:/usr/bin:/bin"


def test_device_model_from_the_vendor_tool_or_no_guess(tmp_path):
    # nvidia-smi names a known model: the plan is for it
    r = dry_run(tmp_path, {"HL_DEVICE": "cuda", "PATH": _tools(tmp_path, nvidia_smi="NVIDIA H100 80GB HBM3")})
    assert r.rc == 0, r.err
    assert "note: device type h100: nvidia-smi names 'NVIDIA H100 80GB HBM3'" in r.plan
    assert r.plan[-1].startswith("memory check: fits on NVIDIA H100 SXM (80 GB)")
    # an unknown model: the dry run says in one line that the check needs HL_PLAN_DEVICE_TYPE
    r = dry_run(tmp_path, {"HL_DEVICE": "cuda", "PATH": _tools(tmp_path, nvidia_smi="NVIDIA A100-SXM4-80GB")})
    assert r.rc == 0 and r.plan == [
        "no memory plan: the device model is unknown (nvidia-smi names 'NVIDIA A100-SXM4-80GB', not one model the "
        "planner has figures for); the memory check needs HL_PLAN_DEVICE_TYPE"]
    # ... and a launch proceeds without it, saying so in one line
    launch = stub_launch(tmp_path, {"HL_DEVICE": "auto", "PATH": _tools(tmp_path)})
    assert launch.rc == 0 and (tmp_path / "launched").exists(), launch.err
    notes = [line for line in launch.err.splitlines() if "memory check" in line]
    assert notes == ["pretrain_deepseek.sh: note: no memory plan: the device model is unknown (no hl-smi; no "
                     "nvidia-smi); launching without the memory check (HL_PLAN_DEVICE_TYPE enables it)"]
    # an explicit HL_PLAN_DEVICE_TYPE wins over the tools
    r = dry_run(tmp_path, {"HL_DEVICE": "cuda", "HL_PLAN_DEVICE_TYPE": "h200",
                           "PATH": _tools(tmp_path, nvidia_smi="NVIDIA H100 80GB HBM3")})
    assert r.plan[-1].startswith("memory check: fits on NVIDIA H200 SXM (141 GB)")


def test_check_skipped_or_unavailable(tmp_path):
    r = dry_run(tmp_path, {"HL_PRECHECK": "0", "HL_PLAN_DEVICE_MEMORY_GB": "0.15"})
    assert r.rc == 0 and r.plan == ["no plan: HL_PRECHECK=0 skips the pre-launch check"]
    # a Python that cannot import the project (no site-packages): a dry run says so, a launch stops
    python = tmp_path / "python-without-site"
    python.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    r = dry_run(tmp_path, {"HL_PYTHON": str(python)})
    assert r.rc == 0 and len(r.plan) == 1
    assert r.plan[0].startswith(f"no plan: HL_PYTHON ({python}) cannot run the check (cannot import this project: ")
    strict = dry_run(tmp_path, {"HL_PYTHON": str(python), "HL_PRECHECK": "1"})
    [line] = strict.error_lines()
    assert strict.rc != 0 and line.startswith(f"pretrain_deepseek.sh: error: HL_PRECHECK: HL_PYTHON ({python}) cannot ")
