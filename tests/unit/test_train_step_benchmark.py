"""benchmarks/train_step.py runs end to end on a tiny proxy: every eager variant does the same work
(first-step losses agree) and the figures it reports are present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_step_benchmark_eager_variants(tmp_path) -> None:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--no-compile", "--no-memory",
           "--hidden", "64", "--layers", "2", "--ffn", "96", "--experts", "4", "--topk", "2", "--moe-ffn", "32",
           "--groups", "1", "--topk-groups", "1", "--vocab", "256", "--heads", "2", "--q-lora", "32", "--kv-lora", "32",
           "--nope", "16", "--rope", "16", "--v-dim", "16", "--batch", "2", "--seq", "32", "--warmup", "1",
           "--iters", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    figures = json.loads(out.read_text())
    losses = figures["first_loss"]
    assert set(losses) == {"hf", "ours", "ours_blas"}
    for kind in ("ours", "ours_blas"):
        assert abs(losses[kind] - losses["hf"]) <= 1e-5 * abs(losses["hf"])
    for kind in losses:
        assert figures[kind]["tokens_per_s"] > 0
    assert figures["speedup_ours_blas_over_hf"] > 0
    assert "ours with torch's default BLAS" in res.stdout
