"""One writer per save directory: a lock file, and owner records on unfinished saves.

    {save}/save.lock             {"host", "pid", "start", "token", "since", "argv"}: the job that
                                 saves into this directory (created with O_EXCL)
    {save}/iter_N.tmp-XXXX/saver.json, iter_N.tmp-old-XXXX/saver.json
                                 {"host", "pid", "start", "token"}: the process responsible for
                                 that unfinished save (or moved-aside copy)

A job takes the lock at start-up (`acquire_save_lock`, collective) and releases it at exit
(`release_save_lock`). A second job is refused with a message naming the owner. A lock whose
owner ran on this host and is gone (no such pid, a zombie, or the pid reused by a process with
another start time) is stale and taken over; a lock of another host cannot be checked from here:
the user deletes the file or passes force=True (flag --ckpt-force-unlock).

Cleaning up after interrupted saves touches only leftovers that cannot belong to a running save:
our own, those of a dead process on this host, and, while this job holds the lock, any other
(the lock guarantees nobody else saves here).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from megatron.training.checkpoint_io import CheckpointError, atomic_write_text, from_rank0, parse_strict_json, rank

LOCK_NAME = "save.lock"
OWNER_NAME = "saver.json"
FORCE_FLAG = "--ckpt-force-unlock"


def _start_time(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (/proc), None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def _state_char(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def identity() -> Dict[str, Any]:
    """This process: host name, pid and start time (which tells a reused pid apart)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def process_state(owner: Dict[str, Any]) -> str:
    """"self", "alive", "dead" (provably: this host, and gone or reused) or "unknown" (other host)."""
    me = identity()
    if owner.get("host") != me["host"] or type(owner.get("pid")) is not int:
        return "unknown"
    pid = owner["pid"]
    if pid == me["pid"] and owner.get("start") == me["start"]:
        return "self"
    if os.path.isdir("/proc"):
        state = _state_char(pid)
        if state is None or state in ("Z", "X"):
            return "dead"
        start = _start_time(pid)
        return "dead" if owner.get("start") is not None and start != owner.get("start") else "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"


def _describe(owner: Dict[str, Any]) -> str:
    return f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since', '?')}"


def _read_record(path: str, retries: int = 5) -> Optional[Dict[str, Any]]:
    """A lock / owner record; None when missing. A record being written right now may read empty:
    retry briefly before calling it unreadable (CheckpointError)."""
    for attempt in range(retries):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable: {exc}") from None
        try:
            value = parse_strict_json(text)
            if isinstance(value, dict):
                return value
        except ValueError:
            pass
        if attempt + 1 < retries:
            time.sleep(0.2)
    raise CheckpointError(f"{path}: unreadable lock record; if no job is saving here, delete it")


@dataclass
class SaveLock:
    save_dir: str
    path: str
    token: str
    owner: Dict[str, Any]


_HELD: Dict[str, SaveLock] = {}  # realpath(save_dir) -> the lock this process holds


def held_lock(save_dir: str) -> Optional[SaveLock]:
    return _HELD.get(os.path.realpath(save_dir))


def _try_create(path: str, record: Dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: str, stale_token: Any) -> None:
    """Remove a stale lock without ever removing a fresh one created meanwhile by another job."""
    aside = f"{path}.stale-{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        record = _read_record(aside, retries=1)
    except CheckpointError:
        record = None
    if record is not None and record.get("token") != stale_token:
        try:
            os.link(aside, path)  # we moved someone's fresh lock: put it back (never overwrites)
        except FileExistsError:
            pass
    os.unlink(aside)


def _acquire_local(save_dir: str, force: bool) -> SaveLock:
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_NAME)
    token = secrets.token_hex(8)
    record = dict(identity(), token=token, since=datetime.datetime.now().isoformat(timespec="seconds"),
                  argv=[str(a) for a in sys.argv[:6]])
    for _ in range(10):
        if _try_create(path, record):
            lock = SaveLock(save_dir=save_dir, path=path, token=token, owner=record)
            _HELD[os.path.realpath(save_dir)] = lock
            return lock
        owner = _read_record(path)
        if owner is None:
            continue  # released meanwhile
        state = process_state(owner)
        if state == "self" and held_lock(save_dir) is not None:
            return held_lock(save_dir)  # type: ignore[return-value]
        if force or state == "dead" or state == "self":
            _take_over(path, owner.get("token"))
            continue
        raise CheckpointError(
            f"{path}: {save_dir} is locked by another job ({_describe(owner)}): one save directory takes one "
            f"writer. If that job is no longer running, delete {path} or start with {FORCE_FLAG}"
        )
    raise CheckpointError(f"{path}: could not take the save lock (contended)")


def _rank() -> int:
    return rank()


def acquire_save_lock(save_dir: str, *, force: bool = False) -> SaveLock:
    """Take the lock of `save_dir` for this job (collective over all ranks when distributed:
    rank 0 holds the file, every rank gets the same result or the same CheckpointError)."""
    result: Any = None
    if _rank() == 0:
        try:
            lock = _acquire_local(save_dir, force)
            result = ("ok", lock.token, lock.owner)
        except (CheckpointError, OSError) as exc:
            result = ("error", str(exc), None)
    result = from_rank0(result)
    if result[0] == "error":
        raise CheckpointError(result[1])
    if _rank() == 0:
        return held_lock(save_dir)  # type: ignore[return-value]
    return SaveLock(save_dir=save_dir, path=os.path.join(save_dir, LOCK_NAME), token=result[1], owner=result[2])


def release_save_lock(lock: Optional[SaveLock]) -> None:
    """Give the lock back (rank 0 removes the file if it is still ours; other ranks do nothing)."""
    if lock is None:
        return
    _HELD.pop(os.path.realpath(lock.save_dir), None)
    if _rank() != 0:
        return
    try:
        owner = _read_record(lock.path, retries=1)
    except CheckpointError:
        return
    if owner is not None and owner.get("token") == lock.token:
        try:
            os.unlink(lock.path)
        except FileNotFoundError:
            pass


def check_writable(save_dir: str) -> Optional[SaveLock]:
    """Rank 0, before a save: refuse when another live (or unverifiable) job holds the lock.

    Returns the lock this process holds on `save_dir`, if any. Saving without holding a lock is
    allowed when nobody else holds one (tools, tests, jobs started without the lock)."""
    path = os.path.join(save_dir, LOCK_NAME)
    mine = held_lock(save_dir)
    owner = _read_record(path)
    if owner is None:
        if mine is not None:
            raise CheckpointError(f"{path}: the save lock of this job disappeared; refusing to save")
        return None
    if mine is not None and owner.get("token") == mine.token:
        return mine
    if mine is None and process_state(owner) == "dead":
        return None  # a stale lock of a dead job on this host: saving cannot collide with it
    raise CheckpointError(
        f"{path}: {save_dir} is locked by another job ({_describe(owner)}); refusing to save into it"
    )


# ---- owner records of unfinished saves ------------------------------------------------------------
def write_owner(directory: str, lock: Optional[SaveLock]) -> None:
    atomic_write_text(os.path.join(directory, OWNER_NAME), json.dumps(dict(identity(), token=lock.token if lock else None)))


def may_remove_leftover(directory: str, lock: Optional[SaveLock]) -> bool:
    """Whether an unfinished save (or moved-aside copy) may be cleaned up by this process."""
    try:
        owner = _read_record(os.path.join(directory, OWNER_NAME), retries=1)
    except CheckpointError:
        owner = None
    if owner is None:
        return lock is not None  # unknown origin: only under the lock, when nobody else may be saving
    state = process_state(owner)
    if state in ("self", "dead"):
        return True
    if state == "alive":
        return False
    return lock is not None
