"""Replacing a .bin/.idx pair: a full disk, an exception or a SIGKILL at any step leaves the old
pair or the new one (never the new .idx beside the old .bin), and stale temporaries of dead
processes are removed while a live process's are kept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron.core.datasets import indexed_dataset as idx_mod
from megatron.core.datasets import pair_files
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError


def build(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(str(prefix), dtype=dtype)
    for doc in docs:
        b.add_document([doc])
    b.finalize()


OLD = [[1, 2, 3], [4, 5]]
NEW = [[7, 8, 9, 10, 11], [12], [13, 14]]


def contents(prefix):
    ds = IndexedDataset(str(prefix))
    out = [ds[i].tolist() for i in range(len(ds))]
    ds.close()
    return out


def snapshot(prefix):
    return {ext: open(f"{prefix}{ext}", "rb").read() for ext in (".bin", ".idx")}


def test_full_disk_while_writing_the_index_keeps_the_old_pair(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    build(prefix, OLD)
    before = snapshot(prefix)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(idx_mod, "_write_index_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build(prefix, NEW)
    assert snapshot(prefix) == before and contents(prefix) == OLD
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # no temporaries, no marker


def test_failure_before_the_marker_keeps_the_old_pair(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    build(prefix, OLD)
    before = snapshot(prefix)

    def failing_fsync(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pair_files, "fsync_file", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        build(prefix, NEW)
    assert snapshot(prefix) == before and sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
import numpy as np
from megatron.core.datasets import pair_files
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if dst.endswith(".bin") and len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # dies with the new .idx in place, the old .bin beside it
    real_replace(src, dst)
pair_files.os.replace = replace
b = IndexedDatasetBuilder(sys.argv[1], dtype=np.uint16)
for doc in [[7, 8, 9, 10, 11], [12], [13, 14]]:
    b.add_document([doc])
b.finalize()
"""


def test_sigkill_between_the_renames_is_refused_then_rolled_forward(tmp_path, repo_root):
    prefix = tmp_path / "d"
    build(prefix, OLD)
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(prefix), "2"], cwd=repo_root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.path.exists(f"{prefix}.commit")
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(str(prefix))
    assert str(err.value) == (
        f"{prefix}.bin/.idx are being replaced ({prefix}.commit); if no process is writing them, an earlier write "
        "was interrupted: rerun the tool that wrote them (tools/preprocess_data.py or tools/merge_datasets.py), "
        "which completes it"
    )
    pair_files.prepare_prefix(str(prefix))  # what the next writer does first
    assert contents(prefix) == NEW
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_reader_reopens_when_the_pair_is_replaced_between_its_two_opens(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    build(prefix, OLD)
    real_open, replaced = open, []

    def racing_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path).endswith(".idx") and not replaced:
            replaced.append(True)
            build(prefix, NEW)  # a whole replacement lands after the reader opened the old .idx
        return f

    monkeypatch.setattr(idx_mod, "open", racing_open, raising=False)
    assert contents(prefix) == NEW and replaced


_WRITE_AND_HANG = """
import sys, time
import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
b = IndexedDatasetBuilder(sys.argv[1], dtype=np.uint16)
b.add_document([[1, 2, 3]])
b._bin.flush()
print("ready", flush=True)
time.sleep(600)
"""


def test_stale_temporaries_removed_live_ones_kept(tmp_path, repo_root):
    prefix = str(tmp_path / "d")
    build(prefix, OLD)
    # A writer killed with SIGKILL leaves its temporary .bin behind.
    dead = subprocess.Popen([sys.executable, "-c", _WRITE_AND_HANG, prefix], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", _WRITE_AND_HANG, prefix], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout.readline().strip() == "ready" and live.stdout.readline().strip() == "ready"
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        dead_tmp, live_tmp = f"{prefix}.bin.tmp.{dead.pid}", f"{prefix}.bin.tmp.{live.pid}"
        assert os.path.exists(dead_tmp) and os.path.exists(live_tmp)
        # a temporary named after a live pid but written before that process started: pid reused
        reused = f"{prefix}.idx.tmp.{live.pid}"
        open(reused, "wb").close()
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        build(prefix, NEW)  # the next run
        assert not os.path.exists(dead_tmp) and not os.path.exists(reused)
        assert os.path.exists(live_tmp)
        assert contents(prefix) == NEW
    finally:
        live.kill()
        live.wait(timeout=30)
        dead.kill()
    assert pair_files.remove_stale_temporaries(prefix) == [live_tmp]


def test_marker_of_a_live_writer_is_respected(tmp_path):
    prefix = str(tmp_path / "d")
    build(prefix, OLD)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open(prefix + ".commit", "w") as f:
            f.write('{"pid": %d, "host": "%s"}' % (sleeper.pid, __import__("socket").gethostname()))
        with pytest.raises(ValueError) as err:
            build(prefix, NEW)
        assert str(err.value) == (
            f"{prefix}.commit: {prefix} is being replaced by a running process (pid {sleeper.pid}); wait for it"
        )
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    build(prefix, NEW)  # the writer is gone: its empty marker is dropped, the new pair committed
    assert contents(prefix) == NEW and sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_partition_parts_of_a_killed_run_are_removed(tmp_path):
    from megatron.training.data_prep.pipeline import remove_stale_parts

    final = str(tmp_path / "o_text_document")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = [f"o_text_document.part1-of-3.tmp{dead_pid}.bin", f"o_text_document.part1-of-3.tmp{dead_pid}.idx",
             f"o_text_document.part2-of-3.tmp{dead_pid}.bin.tmp.{dead_pid}",
             f"o_text_document.part1-of-3.tmp{os.getpid()}.bin"]  # this (live) process's part
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(remove_stale_parts(final)) == sorted(str(tmp_path / n) for n in names[:3])
    assert os.listdir(tmp_path) == [names[3]]
