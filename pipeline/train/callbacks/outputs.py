"""What rank 0 writes when a run ends: ``summary.json`` and ``loss.png``
(``training.callbacks.summary`` / ``training.callbacks.plot``: false switches either off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optsel.pipeline.files import jsonio
from optsel.pipeline.train.callbacks.base import Callback, TrainerServices
from optsel.pipeline.train.plots import plot_run


class SummaryFile(Callback):
    """Writes the run's summary (what ``Trainer.train`` returns) as strict JSON to ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        self.path.write_text(jsonio.dumps(summary, indent=2))


class LossPlot(Callback):
    """Plots ``trainer.state.history`` (per-step metrics, those of steps before a resume included) and the
    initial evaluation to ``path``."""

    def __init__(self, path: Path, title: str):
        self.path, self.title = Path(path), title

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        initial = trainer.state.initial_eval
        if initial is None:
            raise RuntimeError("loss plot: no initial evaluation (EvalCallback.on_train_start sets it)")
        plot_run(trainer.state.history, initial.loss, self.path, self.title)
