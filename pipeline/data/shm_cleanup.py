"""Remove mosaicml-streaming's leftovers from crashed runs without touching a live job.

Every StreamingDataset registers a numeric prefix ``NNNNNN`` and creates POSIX shared memory
``/dev/shm/NNNNNN_<name>`` plus file locks ``<tmp>/NNNNNN_{barrier,cache}_filelock``. A killed run
leaves them behind, and the next run with a remote then fails with "Reused local directory". Streaming's
own ``clean_stale_shared_memory()`` unlinks every prefix from 0 up to the first free one, live jobs'
included, and stops at the first gap. Here a prefix is **live** while any process maps or holds open
one of its shared-memory files (read from ``/proc/<pid>/maps`` and ``/proc/<pid>/fd``); only prefixes
that are not live, owned by this user and older than ``min_age_s`` are removed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

log = logging.getLogger("optsel.shm")

SHM_NAMES = (
    "locals",
    "barrier",
    "next_epoch",
    "cache_usage",
    "shard_states",
    "shard_access_times",
    "resume",
    "epoch_shape",
    "epoch_data",
)
LOCK_NAMES = ("barrier_filelock", "cache_filelock")
_SHM_RE = re.compile(r"^(\d{6})_(" + "|".join(SHM_NAMES) + r")$")
_LOCK_RE = re.compile(r"^(\d{6})_(" + "|".join(LOCK_NAMES) + r")$")


def live_shm_names(shm_dir: str = "/dev/shm") -> set[str]:
    """Basenames under ``shm_dir`` that some process we can inspect maps or holds open."""
    live: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        live.add(line[at + len(prefix) :].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    live.add(target[len(prefix) :].split()[0])
        except OSError:  # process ended, or not ours to inspect (then it cannot open our 0600 files)
            continue
    return live


def clean_stale_streaming_state(
    shm_dir: str = "/dev/shm",
    lock_dir: str | None = None,
    min_age_s: float = 5.0,
    only_prefixes: set[int] | None = None,
) -> list[str]:
    """Unlink streaming shared memory and file locks of prefixes no live process uses.

    A prefix counts as stale when none of its ``/dev/shm`` files is mapped or open, all of them are
    ours and were last changed more than ``min_age_s`` seconds ago (this covers the window between a
    new job creating a segment or lock and mapping it). ``only_prefixes`` limits the sweep to those
    prefixes (the exit cleanup passes the ones this process's datasets used; their age does not
    matter). Returns the removed paths; only removals of *other* runs' leftovers are logged as such.
    """
    lock_dir = lock_dir or tempfile.gettempdir()
    if not os.path.isdir(shm_dir):
        return []
    now, uid = time.time(), os.getuid()
    groups: dict[str, list[Path]] = {}
    for root, regex in ((shm_dir, _SHM_RE), (lock_dir, _LOCK_RE)):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            m = regex.match(name)
            if m:
                groups.setdefault(m.group(1), []).append(Path(root) / name)
    live = live_shm_names(shm_dir)
    removed: list[str] = []
    for prefix, paths in sorted(groups.items()):
        own = only_prefixes is not None
        if only_prefixes is not None and int(prefix) not in only_prefixes:
            continue
        if any(p.name in live for p in paths if str(p.parent) == shm_dir.rstrip("/")):
            continue
        try:
            stats = [p.lstat() for p in paths]
        except FileNotFoundError:
            continue  # changing under us: a job is starting or ending
        if any(s.st_uid != uid or (not own and now - max(s.st_mtime, s.st_ctime) < min_age_s) for s in stats):
            continue
        for p in paths:
            try:
                p.unlink()
                removed.append(str(p))
            except FileNotFoundError:
                pass
    if removed and only_prefixes is None:
        log.info("removed %d stale streaming files (shared memory / file locks) of crashed runs", len(removed))
    elif removed:
        log.debug("removed %d streaming file locks of this process's finished datasets", len(removed))
    return removed
