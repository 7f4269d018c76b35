"""One run per run folder: rank 0 holds an exclusive lock on ``<run_dir>/.optsel.lock`` for the run's life.

The lock is an ``flock`` on the file (released by the kernel when the holder exits, however it exits)
and the file records the holder (pid, host, start time) for the message a second run gets. A lock
file whose ``flock`` can be taken again is stale (its process is gone): the new run takes it over
and says whose it was; on this host it also checks the recorded pid (a live optsel process with that
pid keeps the folder even if its flock was lost). Across hosts the lock relies on the shared
filesystem propagating ``flock`` (NFSv4, Lustre with ``-o flock``, GPFS do); on one that does not, it
only keeps out a second run on the same host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("optsel.lock")

LOCK_NAME = ".optsel.lock"


class RunDirBusyError(RuntimeError):
    """Another live run holds the run folder."""


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (run {holder.get('run_name', '?')}, started "
        f"{holder.get('started', '?')})"
    )


class RunLock:
    """``acquire()`` or RunDirBusyError naming the holder; ``release()`` (idempotent)."""

    def __init__(self, run_dir: str | Path, run_name: str = ""):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.run_name = run_name
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusyError(
                f"run folder {self.run_dir} is in use by another run: {_describe(_holder(self.path))}. "
                f"Wait for it to end, or give this run another output_dir / run_name"
            ) from None
        previous = _holder(self.path)
        here = socket.gethostname()
        if previous:
            host, pid = previous.get("host"), int(previous.get("pid") or 0)
            if host == here and pid and pid != os.getpid() and _pid_alive(pid) and _is_optsel(pid):
                # alive and ours, yet its flock is gone (e.g. the file was replaced): do not steal it
                os.close(fd)
                raise RunDirBusyError(
                    f"run folder {self.run_dir} is in use by another run: {_describe(previous)} (its process is alive)"
                )
            log.warning(
                "run folder %s: taking over the stale lock of %s (that process is gone)",
                self.run_dir,
                _describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": here,
            "run_name": self.run_name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_optsel(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"optsel" in fh.read()
    except OSError:
        return False
