"""benchmarks/checkpoint_memory.py at a small size: a distributed-optimizer save and load never add
more than the read / staging buffer, one checksum block and a little metadata to a rank's
resident memory (the optimizer shard itself is never copied), at DP 1 and 2; the shard halves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LINE = re.compile(r"DP=(\d) rank (\d): optimizer shard\s+([\d.]+) MiB \| save extra\s+([\d.]+) MiB \| "
                  r"load extra\s+([\d.]+) MiB \| bound\s+([\d.]+) MiB")


@pytest.mark.slow
def test_extra_memory_stays_below_buffer_block_and_metadata():
    buffer_mib, block_mib, slack_mib = 2.0, 0.5, 4.0
    cmd = [sys.executable, str(REPO / "benchmarks" / "checkpoint_memory.py"), "--params-m", "8", "--dp", "1", "2",
           "--buffer-mib", str(buffer_mib), "--block-mib", str(block_mib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [tuple(float(x) for x in m) for m in LINE.findall(proc.stdout)]
    assert len(rows) == 3, proc.stdout
    shards = {}
    for dp, rank, shard, save, load, bound in rows:
        shards.setdefault(dp, shard)
        assert max(save, load) <= bound, proc.stdout
        assert max(save, load) <= buffer_mib + block_mib + slack_mib, proc.stdout
    assert shards[2.0] == pytest.approx(shards[1.0] / 2, rel=0.01) and shards[1.0] > 10 * (buffer_mib + block_mib + slack_mib)
    # The read buffer is really used (the measurement sees allocations): load extra is at least its size.
    assert all(load >= buffer_mib * 0.9 for _, _, _, _, load, _ in rows), proc.stdout
