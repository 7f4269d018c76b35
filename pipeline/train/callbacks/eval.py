"""Target evaluation around the loop: before the first step (unless a checkpoint holds it), every
``training.eval_every`` steps and after the last step. Always on."""

from __future__ import annotations

from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices


class EvalCallback(Callback):
    """Runs ``trainer.evaluate()`` (collective: every rank) and adds ``eval/loss`` and
    ``eval/exact_match`` to the step's metrics. The initial evaluation is logged at step 0 and kept in
    ``trainer.state.initial_eval`` (so a resumed run does not redo it); ``trainer.state.last_eval`` is the
    newest result (the initial one before any evaluation step)."""

    def __init__(self, eval_every: int, num_steps: int):
        self.eval_every, self.num_steps = eval_every, num_steps

    def due(self, step: int) -> bool:
        return bool(self.eval_every and step % self.eval_every == 0) or step == self.num_steps

    def on_train_start(self, trainer: TrainerServices) -> None:
        if trainer.state.initial_eval is None:
            initial = trainer.state.initial_eval = trainer.evaluate()
            trainer.sinks.log({"eval/loss": initial.loss, "eval/exact_match": initial.exact_match}, step=0)
        trainer.state.last_eval = trainer.state.initial_eval

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        if self.due(result.step):
            trainer.state.last_eval = trainer.evaluate()
            result.metrics.update(
                {"eval/loss": trainer.state.last_eval.loss, "eval/exact_match": trainer.state.last_eval.exact_match}
            )
