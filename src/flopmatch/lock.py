"""One writer per directory: an advisory lock held for the life of the process that writes a run or a study.

``with DirectoryLock(run, "run"):`` takes ``run/.lock`` with ``fcntl.flock`` and records who holds it
(host, pid, command, start time). A second writer gets a one-line :class:`~flopmatch.errors.UserError`
naming the holder. The kernel releases the lock when its process dies, however it dies, so a lock
left by a killed process is free again; the next writer takes it over and says whose it was. Readers
(``sample``, ``eval`` reading a finished run, ``report``) never take it.

Why flock and not a pid file alone: a pid file needs a liveness check that races with pid reuse and
cannot see processes on other hosts; flock is atomic, released on death, and works on local file
systems and on NFS (where Linux maps it to POSIX locks), which is where SLURM jobs write.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from flopmatch.errors import UserError

LOCK_NAME = ".lock"
# is_locked() takes the lock for a few microseconds to test it: a writer that tries in that instant is not refused
# at once but tries again, this many times this far apart (a real holder keeps the lock for the whole job).
PROBE_RETRIES, PROBE_WAIT_S = 3, 0.02


def holder(directory: str | Path) -> dict | None:
    """Who last held (or holds) the lock of ``directory``: {"host", "pid", "command", "since"}, or None."""
    try:
        info = json.loads((Path(directory) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_locked(directory: str | Path) -> bool:
    """True while some process holds the lock of ``directory`` (tested without taking it for long)."""
    path = Path(directory) / LOCK_NAME
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def describe(info: dict | None) -> str:
    """A holder record as words: 'pid 123 on host (flopmatch train ..., since 12:00:01)'."""
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command', '?')}`, since {since})"


def in_use(directory: str | Path, what: str = "directory") -> UserError:
    """The one-line error for a second writer of ``directory``, naming the process that holds its lock."""
    return UserError(f"{directory} is in use: {describe(holder(directory))} is writing this {what}; "
                     f"wait for it to finish or stop it, then re-run")


class DirectoryLock:
    """Exclusive, non-blocking lock on ``directory`` (created if missing) for the ``with`` block."""

    def __init__(self, directory: str | Path, what: str = "directory"):
        self.directory, self.what = Path(directory), what
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(PROBE_RETRIES + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == PROBE_RETRIES:
                    os.close(fd)
                    raise in_use(self.directory, self.what) from None
                time.sleep(PROBE_WAIT_S)
        # Read the previous holder through this descriptor: on NFS, where flock is emulated with POSIX
        # locks, opening and closing the file again would drop the lock just taken.
        try:
            previous = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except ValueError:
            previous = None
        if isinstance(previous, dict) and previous.get("pid") != os.getpid():
            print(f"{self.directory}: taking over the lock of {describe(previous)}, which is no longer running",
                  file=sys.stderr)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:200], "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean release leaves no holder behind; a crash leaves its record
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
