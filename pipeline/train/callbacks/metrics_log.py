"""The step's metrics into every sink (Prometheus, metrics.jsonl, the textfile) and the trainer's history.

It runs before the checkpoint callback: a step's metrics are written before the checkpoint that counts
the step exists, so a process killed between the two loses nothing (a resume cuts the logs back to the
checkpoint; a checkpoint whose step has no metrics line would leave a hole in metrics.jsonl forever)."""

from __future__ import annotations

from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices


class MetricsLog(Callback):
    """Every rank: ``trainer.sinks.log(result.metrics)`` and ``trainer.state.history.append``. The last
    checkpoint save's wall time rides along as ``checkpoint/save_seconds`` (a gauge: the save a step
    triggers is reported with the next step, since this runs before it)."""

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        if "save" in trainer.state.checkpoint_seconds:
            result.metrics["checkpoint/save_seconds"] = trainer.state.checkpoint_seconds["save"]
        trainer.sinks.log(result.metrics, step=result.step)
        trainer.state.history.append(result.metrics)
