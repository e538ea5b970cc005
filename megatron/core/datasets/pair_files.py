"""Replacing a `.bin/.idx` pair so that no failure leaves a mismatched pair that looks finished.

Two files cannot be renamed at once, so a replacement goes through a commit marker:

    1. the new `.bin` and `.idx` are written under temporary names (`<path>.tmp.<pid>`) and
       fsynced: a full disk or a kill here leaves the old pair untouched;
    2. `<prefix>.commit` is created exclusively (O_EXCL: one writer per prefix) and fsynced; it
       names the two temporary files and their sizes;
    3. the `.idx`, then the `.bin`, are renamed into place;
    4. the marker is removed.

A reader (`IndexedDataset`) refuses a prefix while its marker exists, and after opening both
files checks that the paths still name the inodes it opened; so it sees the old complete pair,
the new complete pair, or an error, never the new `.idx` beside the old `.bin`. A marker left by
a dead writer is rolled forward (steps 3-4 finished) by the next writer of that prefix
(`recover_interrupted_commit`), and temporary files of dead processes are removed
(`remove_stale_temporaries`), never those of a live one.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from typing import List, Optional

COMMIT_SUFFIX = ".commit"
_TMP_RE = re.compile(r"\.tmp\.(\d+)$")


class PairCommitError(ValueError):
    """A pair is being replaced by a live process, or its replacement cannot be completed."""


def tmp_path(path: str) -> str:
    """Where this process writes `path` before committing it."""
    return f"{path}.tmp.{os.getpid()}"


def commit_marker_path(prefix: str) -> str:
    return prefix + COMMIT_SUFFIX


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_start_time(pid: int) -> Optional[float]:
    """Epoch seconds at which process `pid` started (Linux /proc), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(path: str, pid: int) -> bool:
    """Whether `path`, written by `pid`, belongs to no live writer: the process is gone, or the
    process now holding that pid started after the file was last written (the pid was reused)."""
    if pid == os.getpid():
        return False
    if not pid_alive(pid):
        return True
    started = _process_start_time(pid)
    try:
        written = os.path.getmtime(path)
    except OSError:
        return False
    return started is not None and started > written + 1.0  # 1 s: /proc start time is in clock ticks


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Remove `<prefix>.bin.tmp.<pid>` / `<prefix>.idx.tmp.<pid>` left by dead processes (a
    SIGKILL, a power cut); a live process's files are left alone. Returns the removed paths."""
    removed = []
    pattern = glob.escape(prefix) + ".*.tmp.*"
    for path in glob.glob(pattern):
        match = _TMP_RE.search(path)
        if match is None or not path[len(prefix):].startswith((".bin.tmp.", ".idx.tmp.")):
            continue
        if is_stale(path, int(match.group(1))):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _read_marker(marker: str) -> dict:
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # empty or torn: the writer died while creating it, before any rename


def recover_interrupted_commit(prefix: str) -> bool:
    """Finish the replacement of `prefix` that a dead writer left half done (its marker exists):
    both temporary files were complete before the marker was written, so rolling forward gives
    the new pair. Returns True if a marker was handled. Raises PairCommitError if a live process
    (on this machine) or one on another machine holds the marker."""
    marker = commit_marker_path(prefix)
    if not os.path.exists(marker):
        return False
    info = _read_marker(marker)
    pid, host = int(info.get("pid", -1)), info.get("host")
    if host not in (None, socket.gethostname()):
        raise PairCommitError(
            f"{marker}: {prefix} is being replaced by pid {pid} on {host}; if no such process runs, delete "
            f"{marker} and rerun"
        )
    if info and pid != os.getpid() and not is_stale(marker, pid):
        raise PairCommitError(f"{marker}: {prefix} is being replaced by a running process (pid {pid}); wait for it")
    _roll_forward(prefix, marker, info)
    return True


def _roll_forward(prefix: str, marker: str, info: dict) -> None:
    """Steps 3-4 of the commit: rename whichever temporary file is still there, drop the marker."""
    for tmp_key, size_key, final in (("idx_tmp", "idx_size", prefix + ".idx"), ("bin_tmp", "bin_size", prefix + ".bin")):
        tmp = info.get(tmp_key)
        if tmp and os.path.exists(tmp):
            size = os.path.getsize(tmp)
            if size != info.get(size_key):
                raise PairCommitError(f"{marker}: {tmp} has {size} bytes, not the {info.get(size_key)} recorded; "
                                      f"delete {marker} and {prefix}.bin/.idx and rebuild them")
            os.replace(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(prefix)))
    try:
        os.remove(marker)
    except FileNotFoundError:
        pass
    _fsync_dir(os.path.dirname(os.path.abspath(prefix)))


def prepare_prefix(prefix: str) -> None:
    """Before writing `prefix`: finish an interrupted replacement and drop dead temporaries."""
    recover_interrupted_commit(prefix)
    remove_stale_temporaries(prefix)


def commit_pair(prefix: str, bin_tmp: str, idx_tmp: str) -> None:
    """Move the complete temporary files `bin_tmp` / `idx_tmp` onto `<prefix>.bin/.idx` (see the
    module docstring for why a reader never sees a mixed pair)."""
    marker = commit_marker_path(prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    try:  # before the marker exists, a failure leaves the old pair: drop the temporaries
        fsync_file(bin_tmp)
        fsync_file(idx_tmp)
        recover_interrupted_commit(prefix)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "bin_tmp": bin_tmp,
                "idx_tmp": idx_tmp, "bin_size": os.path.getsize(bin_tmp), "idx_size": os.path.getsize(idx_tmp)}
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise PairCommitError(f"{marker}: another process started replacing {prefix} at the same time") from None
        try:
            os.write(fd, json.dumps(info).encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.remove(marker)
            raise
        os.close(fd)
        _fsync_dir(directory)
    except BaseException:
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    # From here on the marker makes readers refuse the prefix until the renames are done; if they
    # are interrupted, the next writer of the prefix rolls them forward.
    _roll_forward(prefix, marker, info)


def commit_in_progress(prefix: str) -> Optional[str]:
    """The commit marker's path if `prefix` is being (or was interruptedly) replaced, else None."""
    marker = commit_marker_path(prefix)
    return marker if os.path.exists(marker) else None
