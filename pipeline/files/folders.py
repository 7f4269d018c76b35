"""Folders beside a user's output that never collide: a run writes into a new sibling and moves the old
output aside into another, so nothing an earlier run saved is overwritten or deleted."""

from __future__ import annotations

from pathlib import Path


def new_sibling(path: Path, suffix: str, what: str) -> Path:
    """A new empty folder ``<path><suffix>[-N]`` beside ``path`` (made by mkdir, so two processes never get
    the same one), for ``what`` (named in the error when 1000 such names are taken)."""
    real = path.resolve()
    for n in range(1000):
        folder = real.with_name(f"{real.name}{suffix}" + (f"-{n}" if n else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {what} next to {path} ({real.name}{suffix} and 999 more exist)")
