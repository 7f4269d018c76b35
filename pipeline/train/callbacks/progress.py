"""The progress bar (rank 0; ``training.progress_bar: false`` switches it off)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices


class ProgressBar(Callback):
    """A tqdm bar over ``num_steps`` showing the step's training loss and the newest eval loss."""

    def __init__(self, num_steps: int, desc: str):
        self.num_steps, self.desc = num_steps, desc
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: TrainerServices) -> None:
        self.bar = tqdm(total=self.num_steps, initial=trainer.state.step, desc=self.desc, unit="step")

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        if self.bar is not None:
            last = trainer.state.last_eval
            if last is None:
                raise RuntimeError("progress bar: no evaluation yet (EvalCallback.on_train_start runs before it)")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.metrics['train/loss']:.3f}", eval=f"{last.loss:.3f}")

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
