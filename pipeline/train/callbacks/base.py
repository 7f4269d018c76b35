"""The callback interface of the training loop (composer's ``Callback``, torchtitan's components).

The loop (``Trainer.train``) runs ``train_step`` and hands its :class:`StepResult` to every callback;
callbacks do everything around the step: evaluation, checkpoints, stopping at a preemption signal,
the selections log, the progress bar, the loss plot and summary.json. A hook's ``trainer`` is a
:class:`TrainerServices`: the run state (``trainer.state``, a typed :class:`TrainerState`) plus the few
things a callback calls (``evaluate``, the engine's checkpoint methods, the sinks, the rank). A
callback records what it measures in a field of ``trainer.state`` or in ``result.metrics``, never as
a new attribute of the trainer. Every hook is optional:

- ``on_train_start(trainer)``: before the first step of this process (after a resume, too);
- ``stop_request()``: this rank's wish to end the run (e.g. a signal arrived), polled once per step
  before the step's all-reduce, which carries it so that every rank stops after the same step;
- ``on_step_end(trainer, result)``: the step is done (``trainer.state.step`` counts it); a callback
  may add keys to ``result.metrics`` (logged to the sinks after the last callback) or set
  ``result.stop`` (the run ends after this step);
- ``on_train_end(trainer, summary)``: the run ended normally (not on an exception) with ``summary``;
- ``close()``: always, when the trainer closes (release files, handlers); idempotent.

Callbacks run in list order (see ``build_callbacks``): a callback sees what the ones before it
added. Each is a small class in its own module, testable alone with a typed stand-in of
:class:`TrainerServices`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # only for annotations: callbacks take the trainer, the trainer builds callbacks
    from optsel.distributed import DistInfo
    from optsel.monitoring.sinks import MultiSink
    from optsel.pipeline.engines.shared import Engine
    from optsel.pipeline.train.evaluate import EvalResult
    from optsel.pipeline.train.state import TrainerState
    from optsel.selection.base import Selection


class TrainerServices(Protocol):
    """What a callback may read and call on the trainer, nothing more. Run state (counters, the last
    evaluation, history, checkpoint timings) is ``state``; a callback records into its typed fields or
    into ``result.metrics``, never a new attribute on the trainer. ``dist``: rank and world size;
    ``engine``: save/load of the engine's checkpoint; ``sinks``: metric sinks; ``evaluate()``: a
    collective evaluation (every rank)."""

    @property
    def state(self) -> TrainerState: ...
    @property
    def dist(self) -> DistInfo: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def sinks(self) -> MultiSink: ...
    def evaluate(self) -> EvalResult: ...


@dataclass(kw_only=True)
class CallbacksConfig:
    """``training.callbacks``: switch off what a run need not write (each on by default). The
    progress bar is ``training.progress_bar``; evaluation, checkpoints and preemption signals are
    always on (``training.eval_every``, ``checkpoint.*`` say when)."""

    selections_log: bool = True  #: <run_dir>/selections.jsonl: the selected sample ids and weights per step
    plot: bool = True  #: <run_dir>/loss.png: training loss per step, target validation loss per evaluation
    summary: bool = True  #: <run_dir>/summary.json (the summary is still returned and printed)


@dataclass
class StepResult:
    """What one ``train_step`` did. ``metrics`` is the step's metrics dict (every sink gets it after the
    callbacks); ``sample_ids`` is the global pool's sample ids (rank-major, None when the stream has
    none); ``stop_requested``: some rank asked to stop (agreed over ranks); ``stop``: why the run ends
    after this step ("" = it goes on), set by callbacks."""

    step: int
    selection: Selection
    losses: torch.Tensor  # this rank's per-sample losses of its trained rows
    loss: float  # the step's global weighted loss
    metrics: dict[str, float]
    sample_ids: torch.Tensor | None = None
    skipped: bool = False  # NaN/Inf loss or gradient: the optimizer step was skipped
    stop_requested: bool = False
    stop: str = ""


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, trainer: TrainerServices) -> None:
        pass

    def stop_request(self) -> str | None:
        return None

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        pass

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackList(Callback):
    """Calls each hook on every callback, in order; ``close`` closes all even if one fails."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer: TrainerServices) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def stop_request(self) -> str | None:
        return next((req for cb in self.callbacks if (req := cb.stop_request())), None)

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, result)

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, summary)

    def close(self) -> None:
        error: BaseException | None = None
        for cb in reversed(self.callbacks):
            try:
                cb.close()
            except BaseException as err:  # close the rest; re-raise the first failure
                error = error or err
        if error is not None:
            raise error

    def __iter__(self):
        return iter(self.callbacks)


class Heartbeat(Callback):
    """``train/last_step_timestamp_seconds``: when the step (and its evaluation) ended; the stalled-run
    alert reads it. Always on."""

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        result.metrics["train/last_step_timestamp_seconds"] = time.time()
