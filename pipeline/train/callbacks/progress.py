"""The progress bar (rank 0; ``training.progress_bar: false`` switches it off)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices

if TYPE_CHECKING:
    from tqdm.auto import tqdm


class ProgressBar(Callback):
    """A tqdm bar over ``num_steps`` showing the step's training loss and the newest eval loss."""

    def __init__(self, num_steps: int, desc: str):
        self.num_steps, self.desc = num_steps, desc
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: TrainerServices) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.num_steps, initial=trainer.state.step, desc=self.desc, unit="step")

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.metrics['train/loss']:.3f}", eval=f"{trainer.state.last_eval.loss:.3f}")

    def on_train_end(self, trainer: TrainerServices, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
