"""benchmarks/device_check.py runs end to end (the reduced CPU version): numerics within bf16
tolerances, throughput of ours and of Hugging Face's model on the same proxy, one table, JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_quick_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--quick", "--skip-tests",
                           "--iters", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["numerics"]["ok"]
    assert report["numerics"]["loss_rel_err"] < 2e-2
    t = report["throughput"]
    assert t["ours"]["tokens_per_s"] > 0 and t["hf"]["tokens_per_s"] > 0 and t["ratio_ours_over_hf"] > 0
    assert "ours / HF" in proc.stdout and "(b) bf16 device vs fp32 cpu | OK" in proc.stdout
