"""One writer at a time: an exclusive OS lock (flock) on a directory or a file.

The kernel releases a flock when the process that holds it exits, however it exits (kill -9, out of memory, a job
timeout), so a lock is never left stale: no lock file to clean up, no process id to check. A directory is locked
through a descriptor of the directory itself, so locking leaves nothing in it. Within one process the lock is
re-entrant (the command line and the training loop both take a run directory's lock). Where the file system has no
locks (some network mounts), holding one is skipped rather than failing the work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class Locked(Exception):
    """Another process holds the lock."""


_held: dict[tuple[int, int], int] = {}  # (device, inode) -> how many holders in this process
_held_guard = threading.Lock()


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _open(path: Path) -> int:
    if path.is_dir():
        return os.open(path, os.O_RDONLY)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(fd: int) -> bool:
    """True if locked now, False if another process holds it; raises OSError for a file system without locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def exclusive(path: str | Path, wait: float = 0.0, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive lock on `path` (an existing directory, or a file created if missing) for the block.
    Raises Locked if another process still holds it after `wait` seconds."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while True:
        fd = _open(path)
        try:
            key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            with _held_guard:
                mine = _held.get(key, 0) > 0
                if mine:
                    _held[key] += 1
            if mine:  # this process holds it already (re-entrant)
                os.close(fd)
                fd = -1
                break
            try:
                got = _try_lock(fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                got = True  # no locks on this file system: go on without one
            # a path removed or replaced while we opened it names another inode now: lock the new one
            if got and _identity(path) == key:
                with _held_guard:
                    _held[key] = _held.get(key, 0) + 1
                break
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        os.close(fd)
        if not got and time.monotonic() >= deadline:
            raise Locked(str(path))
        time.sleep(poll if not got else 0)
    try:
        yield
    finally:
        with _held_guard:
            _held[key] -= 1
            last = _held[key] == 0
            if last:
                del _held[key]
        if fd >= 0:
            os.close(fd)  # closing the descriptor releases the lock


def locked_by_another(path: str | Path) -> bool:
    """Whether another process holds the lock on `path` right now (False for a missing path)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        with _held_guard:
            if _held.get((os.fstat(fd).st_dev, os.fstat(fd).st_ino), 0):
                return False
        try:
            if not _try_lock(fd):
                return True
        except OSError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
