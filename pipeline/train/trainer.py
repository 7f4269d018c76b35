"""The Trainer: one step of optsel, top to bottom, and the loop around it.

draw a pool (every rank the same count) → ``selector.select(pool, target)`` → train on this rank's
selected samples with their global weights (loss scaled by the world size, so the engine's gradient
average is Σ_i w_i g_i over the global selection) → optimizer step → a :class:`StepResult`.

Everything around the step is a callback (``pipeline/train/callbacks/``): evaluation, checkpoints, stopping
at a preemption signal, the selections log, the progress bar, the loss plot and summary.json. The
trainer's own counters are a ``Stateful`` :class:`TrainerState`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from optsel import __version__, distributed
from optsel.config_loader import ConfigError, dump_yaml
from optsel.monitoring.sinks import MultiSink, build_sinks
from optsel.pipeline.checkpoint.run_lock import RunDirBusyError, RunLock
from optsel.pipeline.data import loaders as data_lib
from optsel.pipeline.data.tokenizer import load_tokenizer
from optsel.pipeline.engines.shared import Batch, build_engine
from optsel.pipeline.train.callbacks import (
    CallbackList,
    CheckpointCallback,
    StepResult,
    StopSignals,
    build_callbacks,
)
from optsel.pipeline.train.evaluate import EvalResult, evaluate
from optsel.pipeline.train.held_out import held_out_batches
from optsel.pipeline.train.model import build_model
from optsel.pipeline.train.run_config import RunConfig, method_config
from optsel.pipeline.train.state import TrainerState
from optsel.selection.base import Selection, get_selector_factory
from optsel.selection.stats import selection_metrics

__all__ = [
    "NonFiniteLossError",
    "StepResult",
    "StopSignals",
    "Trainer",
    "backward_on_selection",
    "build_selector",
    "subset",
]

log = logging.getLogger("optsel.train")


def backward_on_selection(
    engine, pool: Batch, selection: Selection, world: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training half of a step, before the optimizer step: the gradient of world · Σ_local w_i ℓ_i
    over this rank's chosen rows, from the selector's single pass when the engine can take it, else a
    forward/backward over the chosen rows. A rank with no chosen row backpropagates one zero-weight
    sample, so the engines' collectives stay in step. Returns (rows [s], weights [s] float32, losses [s])."""
    rows, weights = selection.local_indices, selection.local_weights.to(torch.float32)
    if rows.numel() == 0:
        rows, weights = torch.zeros(1, dtype=torch.long), torch.zeros(1)
    if selection.pool_pass is not None and engine.supports_single_pass:  # no second forward
        losses = engine.backward_from_pass(selection.pool_pass, rows, weights, loss_scale=float(world))
    else:
        losses = engine.forward_backward(subset(pool, rows), weights, loss_scale=float(world))
    return rows, weights, losses


class NonFiniteLossError(RuntimeError):
    """Too many NaN/Inf steps (or nan_policy=raise)."""


def subset(batch: Batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of a batch, trimmed to the longest kept sample."""
    out = {k: v[rows] for k, v in batch.items()}
    if rows.numel():
        width = int(out["attention_mask"].sum(dim=1).max())
        for key in ("input_ids", "attention_mask", "labels"):
            out[key] = out[key][:, :width]
    return out


def build_selector(config: RunConfig, model, optimizer, kind_names: dict[int, str] | None = None):
    """The configured selector, with its typed options block (see ``SelectionConfig.options``)."""
    sel = config.selection
    kwargs: dict[str, Any] = dict(
        model=model, optimizer=optimizer, budget=sel.budget, seed=sel.seed, kind_names=kind_names
    )
    typed = method_config(sel, sel.method)
    if typed is not None:
        kwargs["config"] = typed
    return get_selector_factory(sel.method)(**kwargs)


class Trainer:
    """Owns the engine, the selector, the data, the sinks and the callbacks of one run."""

    def __init__(self, config: RunConfig):
        self._lock: RunLock | None = None
        self.callbacks: CallbackList | None = None  # None until _build gets to it (close() may come first)
        try:
            self._build(config)
        except BaseException:
            self._release_lock()
            raise

    def _callbacks(self) -> CallbackList:
        """The callbacks, built by the constructor (None only while a failed construction is cleaned up)."""
        if self.callbacks is None:
            raise RuntimeError("trainer: not built (its construction failed): no callbacks to run")
        return self.callbacks

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self, config: RunConfig) -> None:
        self.config = config
        self.dist = distributed.init_distributed(config.engine.name, timeout_s=config.engine.collective_timeout_s)
        config.validate_for_world(self.dist.world_size)
        config.check_paths()
        torch.manual_seed(config.training.seed)
        self.run_dir = config.run_dir
        self._lock_run_dir()

        data_dir = Path(config.data.local)
        data_lib.check_local(config.data)
        self.tokenizer = load_tokenizer(data_dir / "tokenizer")
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.kind_names = {v: k for k, v in data_lib.kinds(data_dir).items()}

        self.per_rank_pool = config.selection.pool_size // self.dist.world_size
        model = build_model(
            config.model,
            vocab_size=len(self.tokenizer),
            pad_id=self.pad_id,
            bos_id=self.tokenizer.bos_token_id,
            eos_id=self.eos_id,
        )
        data_lib.check_identity(data_dir, self.tokenizer, model, config.model)  # before the engine and step 1
        self.engine = build_engine(
            config.engine,
            model,
            config.optimizer,
            total_steps=config.training.num_steps,
            micro_batch_size=self.per_rank_pool,
        )
        self.selector = build_selector(config, self.engine.unwrapped_model, self.engine.optimizer, self.kind_names)
        if self.dist.is_main:
            log.info(
                "run %s: engine %s on %s (%s, backend %s), world size %d, selector %s, pool %d, budget %d",
                config.run_name,
                config.engine.name,
                self.engine.device,
                str(getattr(self.engine, "dtype", "")).replace("torch.", ""),
                distributed.default_backend(),
                self.dist.world_size,
                config.selection.method,
                config.selection.pool_size,
                config.selection.budget,
            )

        self.max_seq_len = _effective_max_seq_len(config.data.max_seq_len, model)
        self.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", None) or len(self.tokenizer))
        self.loader = data_lib.build_train_loader(
            dataclasses.replace(config.data, max_seq_len=self.max_seq_len),
            self.per_rank_pool,
            self.dist,
            vocab_size=self.vocab_size,
        )
        self.truncated_samples = 0
        self.empty_train_samples = 0
        self.target, self.eval_batches, self.empty_eval_samples = held_out_batches(
            config, self.dist, self.pad_id, self.max_seq_len, self.vocab_size
        )

        self.state = TrainerState(self.loader, self.selector)
        checkpointing = CheckpointCallback(config, self.run_dir)
        self.resumed_from = checkpointing.start(self)  # before the sinks open metrics.jsonl (a resume cuts it)
        self.sinks = MultiSink(
            build_sinks(
                config.monitoring,
                run_dir=self.run_dir,
                rank=self.dist.rank,
                local_rank=self.dist.local_rank,
                world_size=self.dist.world_size,
                engine=config.engine.name,
                method=config.selection.method,
                run=config.run_name,
            )
        )
        self.sinks.log_info(
            {
                "version": __version__,
                "engine": config.engine.name,
                "method": config.selection.method,
                "world_size": str(self.dist.world_size),
            }
        )
        self.callbacks = build_callbacks(config, self.run_dir, self.dist.is_main, checkpointing, self.dist.world_size)

    def _lock_run_dir(self) -> None:
        """One run per run folder, for the run's life (rank 0 holds the lock; every rank learns of a
        busy folder); then rank 0 writes the resolved config."""
        busy = ""
        if self.dist.is_main:
            lock = RunLock(self.run_dir, self.config.run_name)
            try:
                lock.acquire()
                self._lock = lock
            except RunDirBusyError as err:
                busy = str(err)
        busy = distributed.broadcast_object(busy)
        if busy:
            raise RunDirBusyError(busy)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.config, self.run_dir / "config.yaml")
        distributed.barrier()

    def pools(self) -> Iterator[Batch]:
        """Pools forever, epoch after epoch (every rank gets the same number per epoch). After a
        resume the loader continues inside the saved epoch (possibly at its very end)."""

        def next_epoch() -> None:
            self.state.epoch += 1
            log.info("starting epoch %d", self.state.epoch)

        return data_lib.iterate_pools(
            self.loader,
            next_epoch,
            resumed=self.resumed_from is not None,
            where=f"the train split under {self.config.data.local} (pools of {self.per_rank_pool} per rank)",
        )

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, pool: Batch, data_seconds: float) -> StepResult:
        """Select from ``pool``, train on the selection, step the optimizer (or skip a NaN/Inf step):
        collective. Counts the step in ``self.state``; returns what happened."""
        start = time.perf_counter()
        world = self.dist.world_size
        needs_target = getattr(self.selector, "needs_target", False)
        selection: Selection = self.selector.select(pool, self.target if needs_target else None)
        select_seconds = time.perf_counter() - start

        t0 = time.perf_counter()
        rows, weights, losses = backward_on_selection(self.engine, pool, selection, world)
        train_seconds = time.perf_counter() - t0

        weighted_loss = float((weights.double() * losses.double()).sum())
        local_tokens = float((pool["labels"][rows][:, 1:] != -100).sum()) if selection.local_indices.numel() else 0.0
        stop_flag = 1.0 if self._callbacks().stop_request() else 0.0  # rides on this all-reduce: every rank agrees
        bad_grad = 0.0 if self.engine.local_grads_finite() else 1.0
        totals = distributed.all_reduce_sum(
            torch.tensor(
                [weighted_loss, local_tokens, 0.0 if math.isfinite(weighted_loss) else 1.0, stop_flag, bad_grad],
                dtype=torch.float64,
            )
        )
        loss, tokens = float(totals[0]), float(totals[1])
        bad_loss, bad_grads = bool(totals[2] > 0), bool(totals[4] > 0)
        bad = bad_loss or bad_grads

        t0 = time.perf_counter()
        grad_norm = float("nan")
        if bad:
            self._skip_step(bad_loss)
        else:
            grad_norm = self.engine.step()
        optimizer_seconds = time.perf_counter() - t0
        step_seconds = data_seconds + (time.perf_counter() - start)

        self._count_data(pool)
        kind_ids = distributed.all_gather_cat(pool["kind_id"]) if "kind_id" in pool else None
        sample_ids = distributed.all_gather_cat(pool["sample_id"]) if "sample_id" in pool else None
        self.state.samples_seen += selection.pool_size
        metrics = {
            "train/loss": loss,
            "train/lr": self.engine.lr(),
            "train/grad_norm": grad_norm,
            "train/tokens": tokens,
            "train/samples": float(selection.indices.numel()),
            "train/tokens_per_second": tokens / step_seconds,
            "train/samples_per_second": selection.indices.numel() / step_seconds,
            "train/pool_samples_per_second": selection.pool_size / step_seconds,
            "train/samples_seen": float(self.state.samples_seen),
            "train/skipped_steps": float(self.state.skipped_steps),
            "data/truncated_samples": float(self.truncated_samples),
            "data/empty_samples": float(self.empty_train_samples),
            "time/step_seconds": step_seconds,
            "time/phase/data": data_seconds,
            "time/phase/select": select_seconds,
            "time/phase/train": train_seconds,
            "time/phase/optimizer": optimizer_seconds,
            "time/overhead_ratio": (select_seconds + train_seconds + optimizer_seconds)
            / max(train_seconds + optimizer_seconds, 1e-12),
        }
        metrics.update(selection_metrics(selection, kind_ids, self.kind_names))
        metrics.update(_memory_metrics())
        self.state.step += 1
        return StepResult(
            step=self.state.step,
            selection=selection,
            losses=losses,
            loss=loss,
            metrics=metrics,
            sample_ids=sample_ids,
            skipped=bad,
            stop_requested=bool(totals[3] > 0),
        )

    def _skip_step(self, bad_loss: bool) -> None:
        """The NaN/Inf policy: skip the optimizer step (weights unchanged), or raise."""
        self.engine.skip_step()
        self.state.skipped_steps += 1
        what = "loss" if bad_loss else "gradient (finite loss)"
        log.warning(
            "step %d: NaN/Inf %s; optimizer step skipped, weights unchanged (%d skipped so far)",
            self.state.step + 1,
            what,
            self.state.skipped_steps,
        )
        cfg = self.config.training
        if cfg.nan_policy == "raise" or self.state.skipped_steps > cfg.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self.state.skipped_steps} steps with NaN/Inf loss or gradient "
                f"(training.max_skipped_steps={cfg.max_skipped_steps}, nan_policy={cfg.nan_policy})"
            )

    def _count_data(self, pool: Batch) -> None:
        """Count (and warn once about) pool samples without a loss token and samples cut to length."""
        empty = int(((pool["labels"][:, 1:] != -100).sum(dim=1) == 0).sum())
        if empty:
            if self.empty_train_samples == 0:
                log.warning(
                    "rank %d: train samples without any loss token (all labels -100) were drawn; counted in "
                    "data/empty_samples (a selected one adds no gradient)",
                    self.dist.rank,
                )
            self.empty_train_samples += empty
        if "truncated" in pool and bool(pool["truncated"].any()):
            if self.truncated_samples == 0:
                log.warning(
                    "rank %d: samples longer than %d tokens are cut (data.max_seq_len / the model's "
                    "max_position_embeddings); counted in data/truncated_samples",
                    self.dist.rank,
                    self.max_seq_len,
                )
            self.truncated_samples += int(pool["truncated"].sum())

    def evaluate(self) -> EvalResult:
        return evaluate(self.engine, self.eval_batches, self.config.training.max_new_tokens, self.pad_id, self.eos_id)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.state.history = (
            _logged_history(self.run_dir / "metrics.jsonl")
            if self.resumed_from is not None and self.dist.is_main
            else []
        )
        callbacks = self._callbacks()
        callbacks.on_train_start(self)
        pools, stopped = self.pools(), ""
        while self.state.step < self.config.training.num_steps and not stopped:
            t0 = time.perf_counter()
            pool = next(pools)
            result = self.train_step(pool, time.perf_counter() - t0)
            callbacks.on_step_end(self, result)  # logs, eval, stop decision, metrics, checkpoint, progress
            stopped = result.stop
        if stopped:
            log.warning(
                "stopping after step %d (%s); resume with `optsel train --resume ...`", self.state.step, stopped
            )
        summary = self.summary(stopped, time.perf_counter() - started)
        callbacks.on_train_end(self, summary)
        return summary

    def summary(self, stopped: str, wall_seconds: float) -> dict[str, Any]:
        """What the run did (summary.json; ``optsel train`` prints it)."""
        initial, final = _evaluated(self.state.initial_eval, "initial"), _evaluated(self.state.last_eval, "final")
        history = self.state.history
        return {
            "run_dir": str(self.run_dir),
            "engine": self.config.engine.name,
            "method": self.config.selection.method,
            "world_size": self.dist.world_size,
            "num_steps": self.state.step,
            "target_steps": self.config.training.num_steps,
            "stopped": stopped or None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "checkpoint_seconds": dict(self.state.checkpoint_seconds),
            "pool_size": self.config.selection.pool_size,
            "budget": self.config.selection.budget,
            "samples_seen": self.state.samples_seen,
            "skipped_steps": self.state.skipped_steps,
            "initial_eval_loss": initial.loss,
            "final_eval_loss": final.loss,
            "initial_exact_match": initial.exact_match,
            "final_exact_match": final.exact_match,
            "first_train_loss": history[0]["train/loss"] if history else float("nan"),
            "last_train_loss": history[-1]["train/loss"] if history else float("nan"),
            "mean_step_seconds": sum(h["time/step_seconds"] for h in history) / max(len(history), 1),
            "wall_seconds": wall_seconds,
        }

    def close(self) -> None:
        try:
            if self.callbacks is not None:
                self.callbacks.close()
            self.sinks.close()
            self.engine.close()
        finally:
            self._release_lock()


def _effective_max_seq_len(configured: int | None, model: torch.nn.Module) -> int | None:
    """data.max_seq_len, capped by the model's max_position_embeddings (longer is a config error:
    positions past it are untrained or out of range)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if configured is not None and max_pos is not None and configured > max_pos:
        raise ConfigError("data.max_seq_len", f"{configured} exceeds the model's max_position_embeddings={max_pos}")
    return configured if configured is not None else max_pos


def _logged_history(path: Path) -> list[dict[str, float]]:
    """Per-step metric records of steps before a resume, from metrics.jsonl (for the summary and plot)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {k: (float("nan") if v is None else v) for k, v in r.items()}
        for r in records
        if r.get("step", 0) >= 1 and "train/loss" in r
    ]


def _evaluated(result: EvalResult | None, which: str) -> EvalResult:
    """An evaluation the summary reports (the always-on EvalCallback sets both at train start)."""
    if result is None:
        raise RuntimeError(f"summary: no {which} evaluation (EvalCallback.on_train_start sets it)")
    return result


def _memory_metrics() -> dict[str, float]:
    out = {"sys/rss_bytes": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        out["sys/cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())
    return out
