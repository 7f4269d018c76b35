"""Checkpoint settings (where, how often, how many to keep)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class CheckpointConfig:
    """dir: checkpoint folder ("" = <run_dir>/checkpoints); every_steps: 0 disables periodic saves;
    keep_last: newest complete checkpoints kept."""

    dir: str = ""
    every_steps: int = 0
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
