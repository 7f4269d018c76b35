"""``<run_dir>/selections.jsonl``: per step, the global selected sample ids, their weights and the
pool's sample ids (rank 0 writes it; ``training.callbacks.selections_log: false`` switches it off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from optsel.pipeline.files import jsonio
from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices


def selection_record(result: StepResult) -> dict[str, Any] | None:
    """One line of selections.jsonl (None when the stream has no sample ids)."""
    if result.sample_ids is None:
        return None
    selection = result.selection
    return {
        "step": result.step,
        "sample_ids": result.sample_ids[selection.indices].tolist(),
        "weights": [round(float(w), 6) for w in selection.weights],
        "pool_sample_ids": result.sample_ids.tolist(),
    }


class SelectionsLog(Callback):
    """Appends one record per step to ``path`` (flushed at once: a crash loses no finished step; a
    resume first drops the lines of steps after its checkpoint)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: TextIO | None = self.path.open("a")

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        record = selection_record(result)
        if record is not None and self._file is not None:
            self._file.write(jsonio.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
