"""The trainer's own state, ``Stateful`` (``state_dict`` / ``load_state_dict``) like every other part.

Its ``state_dict`` is what a checkpoint holds per rank (``trainer_rankNNNNN.pt``), key for key:
``step``, ``skipped_steps``, ``samples_seen``, ``epoch``, ``loader`` (the StreamingDataLoader's
position), ``selector`` (the selector's own state_dict), ``torch_rng`` and ``initial_eval``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from optsel.pipeline.train.evaluate import EvalResult

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

    from optsel.selection.base import Selector


class TrainerState:
    """Counters of the run plus the loader and the selector it checkpoints with them.

    step: optimizer steps done (skipped NaN/Inf steps count); skipped_steps: of those, skipped;
    samples_seen: pool samples drawn (global); epoch: passes over the train split; initial_eval: the
    evaluation before the first step (None until it ran).

    What callbacks record lives here too, never as attributes of the trainer (not checkpointed):
    last_eval: the latest evaluation; history: per-step metrics dicts (the summary and the plot);
    checkpoint_seconds: wall seconds of the last "save" and of the "load" at a resume."""

    def __init__(self, loader: Stateful, selector: Selector):
        self.loader, self.selector = loader, selector
        self.step = 0
        self.skipped_steps = 0
        self.samples_seen = 0
        self.epoch = 0
        self.initial_eval: EvalResult | None = None
        self.last_eval: EvalResult | None = None
        self.history: list[dict[str, float]] = []
        self.checkpoint_seconds: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "samples_seen": self.samples_seen,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "selector": self.selector.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "initial_eval": None if self.initial_eval is None else vars(self.initial_eval),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.samples_seen, self.epoch = int(state["samples_seen"]), int(state["epoch"])
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        self.selector.load_state_dict(state["selector"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("initial_eval"):
            self.initial_eval = EvalResult(**state["initial_eval"])
