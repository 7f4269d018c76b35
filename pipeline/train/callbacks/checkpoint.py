"""Checkpoints around the loop: where a run starts (fresh or from which checkpoint, collective) and
when it saves (every ``checkpoint.every_steps``, after the last step of a run that checkpoints, and
at a stop: a preemption signal or ``training.stop_at_step``). Always on; ``checkpoint.*`` says when."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from optsel import __version__, distributed
from optsel.config_loader import redact, to_plain
from optsel.pipeline.checkpoint.manager import CheckpointError, CheckpointManager
from optsel.pipeline.data.config import dataset_identity
from optsel.pipeline.train.callbacks.base import Callback, StepResult, TrainerServices

if TYPE_CHECKING:  # run_config imports CallbacksConfig from here
    from optsel.pipeline.train.run_config import RunConfig

log = logging.getLogger("optsel.train")

#: the run's logs that a resume cuts back to its checkpoint's step and --overwrite moves aside
STEP_LOGS = ("metrics.jsonl", "selections.jsonl")


class CheckpointCallback(Callback):
    """Owns the run's :class:`CheckpointManager`. ``start`` (called while the trainer is built, before
    the sinks open metrics.jsonl) picks and restores the checkpoint; ``on_step_end`` saves. A save
    holds the engine's state and ``trainer.state.state_dict()`` (this rank's ``trainer_rankNNNNN.pt``)."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config  # the RunConfig (its resolved form goes into meta.json)
        self.run_dir = Path(run_dir)
        self.every_steps, self.num_steps = config.checkpoint.every_steps, config.training.num_steps
        self.manager = CheckpointManager(config.checkpoint, self.run_dir)

    def due(self, step: int, stop: str) -> str:
        """The reason to save after ``step`` ("" = none)."""
        if stop:
            return stop
        if self.every_steps and (step % self.every_steps == 0 or step == self.num_steps):
            return "periodic"
        return ""

    def on_step_end(self, trainer: TrainerServices, result: StepResult) -> None:
        reason = self.due(result.step, result.stop)
        if reason:
            self.save(trainer, reason)  # its wall time: checkpoint/save_seconds with the next step (MetricsLog)

    def save(self, trainer: TrainerServices, reason: str) -> Path:
        """Collective: checkpoint the engine, the data position, the selector and the counters."""
        step = trainer.state.step
        meta = {
            "reason": reason,
            "engine": self.config.engine.name,
            "method": self.config.selection.method,
            "optsel_version": __version__,
            "config": redact(to_plain(self.config)),
            "data": dataset_identity(self.config.data),
        }
        path, seconds = self.manager.save(
            step, lambda where: trainer.engine.save_checkpoint(where, {"step": step}), trainer.state.state_dict(), meta
        )
        trainer.state.checkpoint_seconds["save"] = seconds
        if trainer.dist.is_main:
            log.info("checkpoint %s saved (%s) in %.2f s", path, reason, seconds)
        return path

    # -- where the run starts ---------------------------------------------------------------------
    def start(self, trainer: TrainerServices) -> Path | None:
        """Collective: rank 0 chooses (one decision for all ranks); every rank restores from it.
        Returns the checkpoint resumed from (None: a fresh start)."""
        chosen, problem = self.choose_start() if trainer.dist.is_main else ("", "")
        chosen, problem = distributed.broadcast_object((chosen, problem))
        if problem:
            raise CheckpointError(problem)
        if not chosen:
            return None
        self.resume(trainer, Path(chosen))
        return Path(chosen)

    def choose_start(self) -> tuple[str, str]:
        """Rank 0: (checkpoint to resume or "", error message or ""). Checkpoints of an earlier run
        are never deleted implicitly: a fresh start into a folder that holds some is refused unless
        ``checkpoint.overwrite`` (``--overwrite``), which moves them and the run's logs aside."""
        try:
            chosen = self.manager.to_resume()
        except CheckpointError as err:
            return "", str(err)
        if chosen is not None:
            return str(chosen), ""
        earlier = self.manager.complete()
        root = self.manager.root
        if earlier and not self.config.checkpoint.overwrite:  # (an interrupted .partial save is no checkpoint)
            newest = earlier[-1].name
            return "", (
                f"checkpoint.dir: {root} holds checkpoints of an earlier run (newest {newest}); "
                f"continue it with --resume, or start over with --overwrite (checkpoint.overwrite=true: "
                f"moves them aside, deletes nothing), or choose another output_dir / checkpoint.dir"
            )
        if earlier:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = root.with_name(f"{root.name}.replaced-{stamp}")
            root.rename(aside)
            logs_aside = self.run_dir / f"replaced-{stamp}"
            for name in (*STEP_LOGS, "summary.json"):
                if (self.run_dir / name).is_file():
                    logs_aside.mkdir(exist_ok=True)
                    (self.run_dir / name).rename(logs_aside / name)
            log.warning(
                "--overwrite: moved the earlier run's checkpoints to %s%s",
                aside,
                f" and its logs to {logs_aside}" if logs_aside.exists() else "",
            )
        for name in STEP_LOGS:
            truncate_jsonl(self.run_dir / name, -1)
        return "", ""

    def resume(self, trainer: TrainerServices, path: Path) -> None:
        """Restore every stateful piece from checkpoint ``path`` (collective)."""
        start = time.perf_counter()
        self.manager.check_compatible(
            path, redact(to_plain(self.config)), trainer.dist.world_size, data=dataset_identity(self.config.data)
        )
        client = trainer.engine.load_checkpoint(path / "engine")
        state = self.manager.load_rank_state(path)
        if int(client.get("step", state["step"])) != int(state["step"]):
            raise CheckpointError(
                f"checkpoint.resume: {path}: the engine state is from step {client.get('step')} "
                f"but the trainer state from step {state['step']}"
            )
        trainer.state.load_state_dict(state)
        if trainer.dist.is_main:  # drop log lines of steps after the checkpoint (a crashed run got further)
            for name in STEP_LOGS:
                truncate_jsonl(self.run_dir / name, trainer.state.step)
        trainer.state.checkpoint_seconds["load"] = time.perf_counter() - start
        if trainer.dist.is_main:
            log.info(
                "resumed from %s at step %d in %.2f s",
                path,
                trainer.state.step,
                trainer.state.checkpoint_seconds["load"],
            )


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` with ``step`` <= last_step (atomic rewrite)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            log.warning("%s: dropping a torn line (%d characters) written by a crashed run", path, len(line))
            continue
        if record is not None and record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
