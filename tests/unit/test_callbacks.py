"""The trainer's callbacks one at a time (pipeline/train/callbacks/), and switching them off by config.

Each callback runs here with real parts (a real Selection from the random selector, a real
CheckpointManager and TrainerState, real signals, tqdm, matplotlib, the JSONL sink) and a small
stand-in of the trainer (``TrainerServices``: a real TrainerState, DistInfo and the sinks and engine
it needs) that refuses any attribute set, so a callback can only record through the state or the
step's metrics; the last test is one real single-rank run with the switchable callbacks off.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from optsel.config_loader import ConfigError
from optsel.distributed import DistInfo
from optsel.monitoring.sinks import JsonlSink
from optsel.pipeline.train.callbacks import (
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    Heartbeat,
    LossPlot,
    MetricsLog,
    ProgressBar,
    SelectionsLog,
    StepResult,
    StopCallback,
    SummaryFile,
    TrainerServices,
    build_callbacks,
)
from optsel.pipeline.train.callbacks.checkpoint import truncate_jsonl
from optsel.pipeline.train.evaluate import EvalResult
from optsel.pipeline.train.run_config import load_run_config
from optsel.pipeline.train.state import TrainerState
from optsel.selection.base import get_selector_factory

from support.common import REPO


def _config(tmp_path: Path, *overrides: str):
    return load_run_config(
        REPO / "configs/demo.yaml", ["engine.name=fsdp2", f"output_dir={tmp_path}", "run_name=r", *overrides]
    )


def _result(step: int = 3, pool: int = 8, budget: int = 3, seed: int = 0, **kw) -> StepResult:
    """A StepResult around a real Selection of the random selector over a pool with sample ids."""
    selector = get_selector_factory("random")(model=None, optimizer=None, budget=budget, seed=seed)
    pool_batch = {"input_ids": torch.zeros(pool, 4, dtype=torch.long)}
    selection = selector.select(pool_batch)
    kw.setdefault("sample_ids", torch.arange(100, 100 + pool))
    return StepResult(
        step=step,
        selection=selection,
        losses=torch.ones(budget),
        loss=1.5,
        metrics={"train/loss": 1.5, "time/step_seconds": 0.1},
        **kw,
    )


class _Loader:
    """The data loader's Stateful side (the real one needs prepared shards; test_checkpoint runs it)."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


class _Engine:
    """The two checkpoint methods of an Engine: its client state as JSON in the engine folder."""

    def save_checkpoint(self, where: Path, client: dict) -> None:
        where.mkdir(parents=True, exist_ok=True)
        (where / "client.json").write_text(json.dumps(client))

    def load_checkpoint(self, where: Path) -> dict:
        return json.loads((where / "client.json").read_text())


class _Trainer:
    """A typed stand-in of :class:`TrainerServices` whose attributes cannot be set after construction:
    a callback that records anything onto the trainer instead of its state fails here."""

    __slots__ = ("state", "dist", "engine", "sinks", "_evaluate")

    def __init__(self, state: TrainerState, *, sinks: Any = None, evaluate: Any = None, engine: Any = None):
        for name, value in [
            ("state", state),
            ("dist", DistInfo(rank=0, world_size=1)),
            ("engine", engine or _Engine()),
            ("sinks", sinks),
            ("_evaluate", evaluate),
        ]:
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a callback set trainer.{name}; record it in trainer.state or result.metrics")

    def evaluate(self) -> EvalResult:
        return self._evaluate()


def _state(position: int = 0, seed: int = 0, **fields: Any) -> TrainerState:
    """A real TrainerState (random selector, stand-in loader) with ``fields`` set."""
    state = TrainerState(
        _Loader(position), get_selector_factory("random")(model=None, optimizer=None, budget=2, seed=seed)
    )
    for name, value in fields.items():
        setattr(state, name, value)
    return state


def _trainer(config, seed: int = 0, position: int = 0) -> _Trainer:
    return _Trainer(_state(position, seed))


# -- the selections log -------------------------------------------------------------------------------
def test_selections_log_writes_the_step_record(tmp_path):
    result = _result(step=3)
    log = SelectionsLog(tmp_path / "selections.jsonl")
    log.on_step_end(None, result)
    log.on_step_end(None, _result(step=4, sample_ids=None))  # a stream without sample ids: no line
    log.close()
    log.close()  # idempotent
    (record,) = [json.loads(line) for line in (tmp_path / "selections.jsonl").read_text().splitlines()]
    sel = result.selection
    assert record == {
        "step": 3,
        "sample_ids": [100 + int(i) for i in sel.indices],
        "weights": [round(float(w), 6) for w in sel.weights],
        "pool_sample_ids": list(range(100, 108)),
    }
    assert len(record["sample_ids"]) == 3 and abs(sum(record["weights"]) - 1) < 1e-5


# -- checkpoints: when, and a save that a fresh start restores ----------------------------------------
def test_metrics_log_writes_the_step_and_carries_the_last_save_time():
    logged = []
    trainer = _Trainer(_state(), sinks=SimpleNamespace(log=lambda metrics, step: logged.append((step, dict(metrics)))))
    MetricsLog().on_step_end(trainer, first := _result(step=3))
    assert logged == [(3, first.metrics)] and trainer.state.history == [first.metrics]
    assert "checkpoint/save_seconds" not in first.metrics  # no save yet
    trainer.state.checkpoint_seconds["save"] = 1.25  # the checkpoint after step 3 (MetricsLog runs before it)
    MetricsLog().on_step_end(trainer, second := _result(step=4))
    assert logged[-1] == (4, second.metrics) and second.metrics["checkpoint/save_seconds"] == 1.25


def test_checkpoint_decides_periodic_final_and_stop_saves(tmp_path):
    every = CheckpointCallback(_config(tmp_path, "checkpoint.every_steps=4", "training.num_steps=10"), tmp_path)
    assert [s for s in range(1, 11) if every.due(s, "")] == [4, 8, 10]  # periodic, and the last step
    assert every.due(4, "") == "periodic" and every.due(10, "") == "periodic"
    assert every.due(5, "SIGTERM") == "SIGTERM" and every.due(4, "training.stop_at_step=4") == "training.stop_at_step=4"
    never = CheckpointCallback(_config(tmp_path, "checkpoint.every_steps=0", "training.num_steps=10"), tmp_path)
    assert not any(never.due(s, "") for s in range(1, 11))  # no periodic saves, not even at the end
    assert never.due(3, "SIGUSR1") == "SIGUSR1"  # a stop always saves


def test_checkpoint_saves_at_a_stop_and_a_restart_restores_the_trainer_state(tmp_path):
    config = _config(tmp_path, "checkpoint.every_steps=0", "training.num_steps=10")
    trainer = _trainer(config, seed=1, position=7)
    callback = CheckpointCallback(config, config.run_dir)
    assert callback.start(trainer) is None  # nothing to resume: a fresh start
    trainer.state.step, trainer.state.samples_seen, trainer.state.epoch = 2, 128, 1
    trainer.state.initial_eval = EvalResult(loss=2.5, exact_match=0.25, num_samples=16)
    trainer.state.selector.select({"input_ids": torch.zeros(8, 2)})  # move the selector's RNG
    callback.on_step_end(trainer, _result(step=2))
    assert "save" not in trainer.state.checkpoint_seconds and not callback.manager.complete()
    callback.on_step_end(trainer, _result(step=2, stop="SIGTERM"))
    assert trainer.state.checkpoint_seconds["save"] > 0
    (saved,) = callback.manager.complete()
    meta = json.loads((saved / "meta.json").read_text())
    assert saved.name == "step_00000002" and meta["reason"] == "SIGTERM"
    on_disk = torch.load(saved / "trainer_rank00000.pt", weights_only=True)
    assert set(on_disk) == {
        "step",
        "skipped_steps",
        "samples_seen",
        "epoch",
        "loader",
        "selector",
        "torch_rng",
        "initial_eval",
    }  # the checkpoint format is unchanged
    assert on_disk["initial_eval"] == {"loss": 2.5, "exact_match": 0.25, "num_samples": 16}

    resumed_config = _config(
        tmp_path,
        "checkpoint.every_steps=0",
        "training.num_steps=10",
        "checkpoint.resume=auto",
        "training.callbacks.plot=false",
    )  # switches may change across a resume
    other = _trainer(resumed_config, seed=99)
    assert CheckpointCallback(resumed_config, config.run_dir).start(other) == saved
    assert (other.state.step, other.state.samples_seen, other.state.epoch, other.state.loader.position) == (
        2,
        128,
        1,
        7,
    )
    assert other.state.initial_eval == trainer.state.initial_eval and "load" in other.state.checkpoint_seconds
    pool = {"input_ids": torch.zeros(8, 2)}
    assert torch.equal(other.state.selector.select(pool).indices, trainer.state.selector.select(pool).indices)


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "x": \n')
    truncate_jsonl(path, 1)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


# -- stopping ---------------------------------------------------------------------------------------
def test_stop_callback_turns_a_signal_into_a_stop_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopCallback(["SIGUSR1"], stop_at_step=0, num_steps=10)
    try:
        assert stop.stop_request() is None
        stop.on_step_end(None, result := _result(step=1))
        assert result.stop == ""
        stop.on_step_end(None, result := _result(step=1, stop_requested=True))  # another rank got a signal
        assert result.stop == "signal on another rank"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.stop_request() == "SIGUSR1"
        assert CallbackList([Heartbeat(), stop]).stop_request() == "SIGUSR1"
        stop.on_step_end(None, result := _result(step=2, stop_requested=True))
        assert result.stop == "SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_stop_at_step_ends_the_run_before_num_steps_only(tmp_path):
    stop = StopCallback([], stop_at_step=3, num_steps=5)
    try:
        stops = []
        for step in range(1, 6):
            stop.on_step_end(None, result := _result(step=step))
            stops.append(result.stop)
        assert stops == ["", "", "training.stop_at_step=3", "training.stop_at_step=3", ""]
    finally:
        stop.close()


# -- evaluation -------------------------------------------------------------------------------------
def test_eval_runs_first_at_eval_every_and_at_the_end_and_logs_the_initial_one(tmp_path):
    results = iter(EvalResult(loss=3.0 - i, exact_match=0.1 * i, num_samples=4) for i in range(10))
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    trainer = _Trainer(_state(), evaluate=lambda: next(results), sinks=sink)
    callback = EvalCallback(eval_every=2, num_steps=5)
    callback.on_train_start(trainer)
    assert trainer.state.initial_eval.loss == 3.0 and trainer.state.last_eval is trainer.state.initial_eval
    evaluated = []
    for step in range(1, 6):
        callback.on_step_end(trainer, result := _result(step=step))
        evaluated.append(result.metrics.get("eval/loss"))
    assert evaluated == [None, 2.0, None, 1.0, 0.0] and trainer.state.last_eval.loss == 0.0
    sink.close()
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 0 and line["eval/loss"] == 3.0
    resumed = _Trainer(_state(initial_eval=EvalResult(1.0, 0.5, 4)))
    EvalCallback(eval_every=0, num_steps=5).on_train_start(resumed)  # a checkpoint held it: not evaluated again
    assert resumed.state.last_eval.loss == 1.0


# -- progress bar, summary.json, loss.png -------------------------------------------------------------
def test_progress_bar_counts_steps_from_the_resumed_step(tmp_path):
    trainer = _Trainer(_state(step=4, last_eval=EvalResult(2.0, 0.0, 4)))
    bar = ProgressBar(num_steps=10, desc="train [random]")
    bar.on_train_start(trainer)
    bar.on_step_end(trainer, _result(step=5))
    assert bar.bar.n == 5 and bar.bar.total == 10
    bar.on_train_end(trainer, {})
    assert bar.bar is None
    bar.close()


def test_summary_file_and_loss_plot(tmp_path):
    history = [{"train/loss": 2.0 - 0.1 * i, **({"eval/loss": 1.8} if i == 2 else {})} for i in range(4)]
    trainer = _Trainer(_state(history=history, initial_eval=EvalResult(2.2, 0.0, 4)))
    summary = {"num_steps": 4, "final_eval_loss": float("nan")}
    CallbackList(
        [SummaryFile(tmp_path / "summary.json"), LossPlot(tmp_path / "loss.png", "random / fsdp2 / 1 ranks")]
    ).on_train_end(trainer, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"num_steps": 4, "final_eval_loss": None}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_built_in_callback_sets_an_attribute_on_the_trainer(tmp_path):
    config = _config(tmp_path, "checkpoint.every_steps=1", "training.num_steps=2", "training.eval_every=1")
    results = iter(EvalResult(loss=2.0 - i, exact_match=0.0, num_samples=4) for i in range(3))
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    trainer: TrainerServices = _Trainer(_state(), evaluate=lambda: next(results), sinks=sink)
    with pytest.raises(AttributeError):
        trainer.last_eval = None  # type: ignore[misc]  # the stand-in refuses what a callback must not do
    checkpoint = CheckpointCallback(config, config.run_dir)
    assert checkpoint.start(trainer) is None
    callbacks = CallbackList(
        [
            SelectionsLog(tmp_path / "selections.jsonl"),
            EvalCallback(eval_every=1, num_steps=2),
            StopCallback([], stop_at_step=0, num_steps=2),
            Heartbeat(),
            MetricsLog(),
            checkpoint,
            ProgressBar(num_steps=2, desc="train"),
            SummaryFile(tmp_path / "summary.json"),
            LossPlot(tmp_path / "loss.png", "random"),
        ]
    )
    try:
        callbacks.on_train_start(trainer)
        for step in (1, 2):
            trainer.state.step = step
            callbacks.on_step_end(trainer, _result(step=step))
        callbacks.on_train_end(trainer, {"num_steps": 2})
    finally:
        callbacks.close()
        sink.close()
    assert [h["eval/loss"] for h in trainer.state.history] == [1.0, 0.0]  # recorded through the state
    assert trainer.state.last_eval.loss == 0.0 and trainer.state.checkpoint_seconds["save"] > 0


# -- what the config switches -----------------------------------------------------------------------
def _kinds(callbacks) -> list[str]:
    return [type(cb).__name__ for cb in callbacks]


def test_build_callbacks_order_and_switches(tmp_path):
    config = _config(tmp_path, "training.progress_bar=true")
    checkpointing = CheckpointCallback(config, config.run_dir)
    config.run_dir.mkdir(parents=True)
    everything = build_callbacks(config, config.run_dir, True, checkpointing, 2)
    try:
        assert _kinds(everything) == [
            "SelectionsLog",
            "EvalCallback",
            "Heartbeat",
            "StopCallback",
            "MetricsLog",
            "CheckpointCallback",
            "ProgressBar",
            "SummaryFile",
            "LossPlot",
        ]
    finally:
        everything.close()
    off = _config(
        tmp_path,
        "training.progress_bar=false",
        "training.callbacks.selections_log=false",
        "training.callbacks.plot=false",
        "training.callbacks.summary=false",
    )
    quiet = build_callbacks(off, off.run_dir, True, checkpointing, 2)
    other_rank = build_callbacks(config, config.run_dir, False, checkpointing, 2)  # rank > 0 writes no file
    try:
        assert (
            _kinds(quiet)
            == _kinds(other_rank)
            == ["EvalCallback", "Heartbeat", "StopCallback", "MetricsLog", "CheckpointCallback"]
        )
    finally:  # the reverse of building: each StopCallback restores the handler it found
        other_rank.close()
        quiet.close()


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.callbacks.plots=false", "training.callbacks.plots"),
        ("training.callbacks.summary=maybe", "training.callbacks.summary"),
        ("training.callbacks=3", "training.callbacks"),
    ],
)
def test_bad_callback_switches_are_errors_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, override)
    assert err.value.path == key


def test_a_run_with_the_switchable_callbacks_off_writes_none_of_their_files(prepare_synthetic, tmp_path):
    data_dir = prepare_synthetic("callbacks-shards", num_train=128, num_val=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    common = [
        "configs/demo.yaml",
        f"data.local={data_dir}",
        "engine.name=fsdp2",
        "selection.method=random",
        "training.num_steps=2",
        "training.eval_every=0",
        "training.num_eval_samples=8",
        "selection.num_target_samples=8",
        "selection.pool_size=8",
        "selection.budget=2",
        "monitoring.port=0",
        "checkpoint.every_steps=0",
        "training.progress_bar=false",
    ]
    for name, switches in (
        ("on", []),
        (
            "off",
            [
                "training.callbacks.selections_log=false",
                "training.callbacks.plot=false",
                "training.callbacks.summary=false",
            ],
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "optsel.launch.train", *common, f"output_dir={tmp_path / name}", *switches],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert (
            json.loads(done.stdout[done.stdout.index("{\n") : done.stdout.rindex("}") + 1])["num_steps"] == 2
        )  # the summary is printed
        (outputs,) = [line for line in done.stdout.splitlines() if line.startswith("outputs in")]
        assert ("selections.jsonl" in outputs and "loss.png" in outputs) == (name == "on"), outputs
    on, off = tmp_path / "on" / "demo", tmp_path / "off" / "demo"
    for name in ("selections.jsonl", "summary.json", "loss.png"):
        assert (on / name).is_file() and not (off / name).exists(), name
    for run in (on, off):  # the metrics are the same either way
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2]
