"""The parts of a run around ``train_step``, as callbacks (see ``base`` for the interface)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from optsel.pipeline.train.callbacks.base import (
    Callback,
    CallbackList,
    CallbacksConfig,
    Heartbeat,
    StepResult,
    TrainerServices,
)
from optsel.pipeline.train.callbacks.checkpoint import CheckpointCallback
from optsel.pipeline.train.callbacks.eval import EvalCallback
from optsel.pipeline.train.callbacks.metrics_log import MetricsLog
from optsel.pipeline.train.callbacks.outputs import LossPlot, SummaryFile
from optsel.pipeline.train.callbacks.progress import ProgressBar
from optsel.pipeline.train.callbacks.selections_log import SelectionsLog
from optsel.pipeline.train.callbacks.signals import StopCallback, StopSignals

if TYPE_CHECKING:  # run_config imports CallbacksConfig from here
    from optsel.pipeline.train.run_config import RunConfig

__all__ = [
    "Callback",
    "CallbackList",
    "CallbacksConfig",
    "CheckpointCallback",
    "EvalCallback",
    "Heartbeat",
    "LossPlot",
    "MetricsLog",
    "ProgressBar",
    "SelectionsLog",
    "StepResult",
    "StopCallback",
    "StopSignals",
    "SummaryFile",
    "TrainerServices",
    "build_callbacks",
]


def build_callbacks(
    config: RunConfig, run_dir: Path, is_main: bool, checkpointing: CheckpointCallback, world_size: int
) -> CallbackList:
    """The run's callbacks in the order they run (``config`` is the RunConfig). Every rank runs the
    collective ones (eval, stop, checkpoint); rank 0 alone writes the logs and files."""
    train, switches = config.training, config.training.callbacks
    run_dir = Path(run_dir)
    callbacks: list[Callback] = []
    if is_main and switches.selections_log:
        callbacks.append(SelectionsLog(run_dir / "selections.jsonl"))
    callbacks += [
        EvalCallback(train.eval_every, train.num_steps),
        Heartbeat(),
        StopCallback(config.checkpoint.save_on_signals, train.stop_at_step, train.num_steps),
        MetricsLog(),
        checkpointing,
    ]  # the step's metrics are written before its checkpoint exists
    if is_main and train.progress_bar:
        callbacks.append(ProgressBar(train.num_steps, f"train [{config.selection.method}]"))
    if is_main and switches.summary:
        callbacks.append(SummaryFile(run_dir / "summary.json"))
    if is_main and switches.plot:
        callbacks.append(
            LossPlot(run_dir / "loss.png", f"{config.selection.method} / {config.engine.name} / {world_size} ranks")
        )
    return CallbackList(callbacks)
