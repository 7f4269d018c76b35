"""Ending a run early: at a preemption signal (agreed over ranks) or at ``training.stop_at_step``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices

log = logging.getLogger("optsel.train")


class StopSignals:
    """Remembers the first of ``names`` (e.g. SIGTERM, SIGUSR1) or SIGINT (Ctrl-C) that arrives; the
    trainer agrees on it across ranks at the next step boundary, checkpoints and ends the run. A second
    Ctrl-C (more than ``SIGINT_REPEAT_S`` after the first: a launcher forwarding the terminal's Ctrl-C
    to its workers is the same press) exits at once, without a checkpoint. Restores the previous
    handlers on ``close``. Only the main thread can install handlers (elsewhere: a no-op)."""

    SIGINT_REPEAT_S = 1.0

    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._first_sigint: float | None = None
        self._previous: dict[signal.Signals, object] = {}

        if threading.current_thread() is not threading.main_thread():
            return
        for name in dict.fromkeys([*names, "SIGINT"]):
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        name = signal.Signals(signum).name
        if name == "SIGINT":
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.SIGINT_REPEAT_S:
                print("optsel: second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
            if self._first_sigint is None:
                self._first_sigint = now
        if self.received is None:
            self.received = name
            log.warning(
                "received %s: will checkpoint and stop at the end of this step%s",
                self.received,
                " (Ctrl-C again to exit at once, without a checkpoint)" if name == "SIGINT" else "",
            )

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


class StopCallback(Callback):
    """Installs the handlers of ``checkpoint.save_on_signals`` (+ SIGINT) when built, asks the run to
    stop once one arrived, and sets ``result.stop`` after the step at which the ranks agreed to stop
    (the signal's name; "signal on another rank" where this rank got none) or, without a signal, after
    ``stop_at_step`` (when that is before ``num_steps``). The checkpoint callback, after this one, saves
    at a stop. Always on."""

    def __init__(self, signal_names: list[str], stop_at_step: int, num_steps: int):
        self.signals = StopSignals(signal_names)
        self.stop_at_step, self.num_steps = stop_at_step, num_steps

    def stop_request(self) -> str | None:
        return self.signals.received

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        if result.stop_requested:
            result.stop = self.signals.received or "signal on another rank"
        elif self.stop_at_step and self.num_steps > result.step >= self.stop_at_step:
            result.stop = f"training.stop_at_step={self.stop_at_step}"

    def close(self) -> None:
        self.signals.close()
