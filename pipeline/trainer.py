"""The Trainer: one step of optsel, top to bottom.

draw a pool (every rank the same count) → ``selector.select(pool, target)`` → train on this rank's
selected samples with their global weights (loss scaled by the world size, so the engine's gradient
average is Σ_i w_i g_i over the global selection) → optimizer step → metrics to every sink.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from optsel import __version__, distributed
from optsel.config_loader import ConfigError, dump_yaml, redact, to_plain
from optsel.pipeline.run_config import RunConfig, method_config
from optsel.monitoring.sinks import MultiSink, build_sinks
from optsel.pipeline import data as data_lib
from optsel.pipeline import jsonio
from optsel.pipeline.checkpoint import CheckpointError, CheckpointManager
from optsel.pipeline.engines.base import Batch, build_engine
from optsel.pipeline.evaluate import EvalResult, evaluate
from optsel.pipeline.model import build_model
from optsel.pipeline.plots import plot_run
from optsel.pipeline.run_lock import RunDirBusyError, RunLock
from optsel.pipeline.tokenizer import load_tokenizer
from optsel.selection.base import Selection, get_selector_factory
from optsel.selection.stats import selection_metrics

log = logging.getLogger("optsel.train")


class NonFiniteLossError(RuntimeError):
    """Too many NaN/Inf steps (or nan_policy=raise)."""


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
        import threading

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
                import os
                import sys

                print("optsel: second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
            if self._first_sigint is None:
                self._first_sigint = now
        if self.received is None:
            self.received = name
            log.warning("received %s: will checkpoint and stop at the end of this step%s", self.received,
                        " (Ctrl-C again to exit at once, without a checkpoint)" if name == "SIGINT" else "")

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


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
    kwargs: dict[str, Any] = dict(model=model, optimizer=optimizer, budget=sel.budget, seed=sel.seed,
                                  kind_names=kind_names)
    typed = method_config(sel, sel.method)
    if typed is not None:
        kwargs["config"] = typed
    return get_selector_factory(sel.method)(**kwargs)


class Trainer:
    """Owns the engine, the selector, the data and the sinks for one run."""

    def __init__(self, config: RunConfig):
        self._lock: RunLock | None = None
        try:
            self._build(config)
        except BaseException:
            self._release_lock()
            raise

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
        busy = ""
        if self.dist.is_main:  # one run per run folder, for the run's life
            lock = RunLock(self.run_dir, config.run_name)
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
            dump_yaml(config, self.run_dir / "config.yaml")
        distributed.barrier()

        data_dir = Path(config.data.local)
        self.tokenizer = load_tokenizer(data_dir / "tokenizer")
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.kind_names = {v: k for k, v in data_lib.kinds(data_dir).items()}

        self.per_rank_pool = config.selection.pool_size // self.dist.world_size
        model = build_model(config.model, vocab_size=len(self.tokenizer), pad_id=self.pad_id,
                            bos_id=self.tokenizer.bos_token_id, eos_id=self.eos_id)
        self.engine = build_engine(config.engine, model, config.optimizer, total_steps=config.training.num_steps,
                                   micro_batch_size=self.per_rank_pool)
        self.selector = build_selector(config, self.engine.unwrapped_model, self.engine.optimizer, self.kind_names)
        if self.dist.is_main:
            log.info("run %s: engine %s on %s (%s, backend %s), world size %d, selector %s, pool %d, budget %d",
                     config.run_name, config.engine.name, self.engine.device,
                     str(getattr(self.engine, "dtype", "")).replace("torch.", ""), distributed.default_backend(),
                     self.dist.world_size, config.selection.method, config.selection.pool_size,
                     config.selection.budget)

        self.max_seq_len = _effective_max_seq_len(config.data.max_seq_len, model)
        self.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", None) or len(self.tokenizer))
        self.loader = data_lib.build_train_loader(dataclasses.replace(config.data, max_seq_len=self.max_seq_len),
                                                  self.per_rank_pool, self.dist, vocab_size=self.vocab_size)
        self.truncated_samples = 0
        self.empty_train_samples = 0
        self.target, self.eval_batches = self._held_out_batches()

        self.step = 0
        self.skipped_steps = 0
        self.samples_seen = 0
        self.epoch = 0
        self.initial_eval: EvalResult | None = None
        self.checkpoint_seconds: dict[str, float] = {}
        self.checkpoints = CheckpointManager(config.checkpoint, self.run_dir)
        chosen, problem = (self._choose_start() if self.dist.is_main else ("", ""))
        chosen, problem = distributed.broadcast_object((chosen, problem))  # one decision for all ranks
        if problem:
            raise CheckpointError(problem)
        self.resumed_from = Path(chosen) if chosen else None
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        self.sinks = MultiSink(build_sinks(config.monitoring, run_dir=self.run_dir, rank=self.dist.rank,
                                           local_rank=self.dist.local_rank, world_size=self.dist.world_size,
                                           engine=config.engine.name, method=config.selection.method))
        self.sinks.log_info({"version": __version__, "engine": config.engine.name,
                             "method": config.selection.method, "world_size": str(self.dist.world_size)})
        self._selections_file = (self.run_dir / "selections.jsonl").open("a") if self.dist.is_main else None
        self.signals = StopSignals(config.checkpoint.save_on_signals)
        self._stop_requested = False

    # -- checkpoints ----------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
                "epoch": self.epoch, "loader": self.loader.state_dict(), "selector": self.selector.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "initial_eval": None if self.initial_eval is None else vars(self.initial_eval)}

    def save_checkpoint(self, reason: str) -> Path:
        """Collective: checkpoint the engine, the data position, the selector and the counters."""
        meta = {"reason": reason, "engine": self.config.engine.name, "method": self.config.selection.method,
                "optsel_version": __version__, "config": redact(to_plain(self.config))}
        path, seconds = self.checkpoints.save(
            self.step, lambda where: self.engine.save_checkpoint(where, {"step": self.step}), self._rank_state(), meta)
        self.checkpoint_seconds["save"] = seconds
        if self.dist.is_main:
            log.info("checkpoint %s saved (%s) in %.2f s", path, reason, seconds)
        return path

    def _choose_start(self) -> tuple[str, str]:
        """Rank 0: (checkpoint to resume or "", error message or ""). Checkpoints of an earlier run
        are never deleted implicitly: a fresh start into a folder that holds some is refused unless
        ``checkpoint.overwrite`` (``--overwrite``), which moves them and the run's logs aside."""
        try:
            chosen = self.checkpoints.to_resume()
        except CheckpointError as err:
            return "", str(err)
        if chosen is not None:
            return str(chosen), ""
        earlier = self.checkpoints.complete()
        if earlier and not self.config.checkpoint.overwrite:  # (an interrupted .partial save is no checkpoint)
            newest = earlier[-1].name
            return "", (f"checkpoint.dir: {self.checkpoints.root} holds checkpoints of an earlier run (newest {newest}); "
                        f"continue it with --resume, or start over with --overwrite (checkpoint.overwrite=true: "
                        f"moves them aside, deletes nothing), or choose another output_dir / checkpoint.dir")
        if earlier:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.checkpoints.root.with_name(f"{self.checkpoints.root.name}.replaced-{stamp}")
            self.checkpoints.root.rename(aside)
            logs_aside = self.run_dir / f"replaced-{stamp}"
            for name in ("metrics.jsonl", "selections.jsonl", "summary.json"):
                if (self.run_dir / name).is_file():
                    logs_aside.mkdir(exist_ok=True)
                    (self.run_dir / name).rename(logs_aside / name)
            log.warning("--overwrite: moved the earlier run's checkpoints to %s%s", aside,
                        f" and its logs to {logs_aside}" if logs_aside.exists() else "")
        for name in ("metrics.jsonl", "selections.jsonl"):
            _truncate_jsonl(self.run_dir / name, -1)
        return "", ""

    def _resume(self, path: Path) -> None:
        """Restore every stateful piece from checkpoint ``path`` (collective)."""
        start = time.perf_counter()
        self.checkpoints.check_compatible(path, redact(to_plain(self.config)), self.dist.world_size)
        client = self.engine.load_checkpoint(path / "engine")
        state = self.checkpoints.load_rank_state(path)
        if int(client.get("step", state["step"])) != int(state["step"]):
            raise CheckpointError(f"checkpoint.resume: {path}: the engine state is from step {client.get('step')} "
                                  f"but the trainer state from step {state['step']}")
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.samples_seen, self.epoch = int(state["samples_seen"]), int(state["epoch"])
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        self.selector.load_state_dict(state["selector"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("initial_eval"):
            self.initial_eval = EvalResult(**state["initial_eval"])
        if self.dist.is_main:  # drop log lines of steps after the checkpoint (a crashed run got further)
            for name in ("metrics.jsonl", "selections.jsonl"):
                _truncate_jsonl(self.run_dir / name, self.step)
        self.checkpoint_seconds["load"] = time.perf_counter() - start
        if self.dist.is_main:
            log.info("resumed from %s at step %d in %.2f s", path, self.step, self.checkpoint_seconds["load"])

    # -- data -----------------------------------------------------------------------------------
    def _held_out_batches(self) -> tuple[Batch, list[Batch]]:
        """This rank's share of the target (selection) samples and of the evaluation samples."""
        sel, train = self.config.selection, self.config.training
        rank, world = self.dist.rank, self.dist.world_size
        val = data_lib.load_split(self.config.data, "val", vocab_size=self.vocab_size)
        needed = sel.num_target_samples + train.num_eval_samples
        if len(val) < needed:
            raise ConfigError("training.num_eval_samples",
                              f"the val split has {len(val)} samples, fewer than num_target_samples + "
                              f"num_eval_samples = {needed}")
        target_rows = list(range(sel.num_target_samples))[rank::world]
        eval_rows = list(range(sel.num_target_samples, needed))
        eval_rows = eval_rows[: len(eval_rows) // world * world][rank::world]  # same count on every rank
        target = data_lib.collate([val[i] for i in target_rows], self.pad_id, self.max_seq_len)
        eval_batches = [data_lib.collate([val[i] for i in eval_rows[j:j + 32]], self.pad_id, self.max_seq_len)
                        for j in range(0, len(eval_rows), 32)]
        self._check_loss_tokens(target, eval_batches, len(val))
        return target, eval_batches

    def _check_loss_tokens(self, target: Batch, eval_batches: list[Batch], val_size: int) -> None:
        """Refuse a target or eval split in which no sample has a loss token (every label -100: the
        eval loss would read 0.0, which looks perfect); count and warn for single such samples."""
        def counts(batches: list[Batch]) -> list[float]:
            per_sample = [(b["labels"][:, 1:] != -100).sum(dim=1) for b in batches]
            flat = torch.cat(per_sample) if per_sample else torch.zeros(0, dtype=torch.long)
            return [float(flat.numel()), float((flat == 0).sum()), float(flat.sum())]

        totals = distributed.all_reduce_sum(torch.tensor(counts([target]) + counts(eval_batches), dtype=torch.float64))
        sel, train = self.config.selection, self.config.training
        where = f"the val split under {self.config.data.remote or self.config.data.local}"
        for name, (n, empty, tokens), rows in (
                ("target", totals[:3].tolist(), f"rows 0-{sel.num_target_samples - 1}, selection.num_target_samples"),
                ("eval", totals[3:].tolist(), f"rows {sel.num_target_samples}-"
                                              f"{sel.num_target_samples + train.num_eval_samples - 1}, "
                                              f"training.num_eval_samples")):
            if n > 0 and tokens == 0:
                raise data_lib.ShardError(
                    f"{where}: every one of its {int(n)} {name} samples ({rows}) has no loss token (all labels -100, "
                    f"e.g. prompt_len == length{' or cut by data.max_seq_len' if self.max_seq_len else ''}); its loss "
                    f"would read 0.0. Re-prepare the data with answers")
            if empty and self.dist.is_main:
                log.warning("%s: %d of %d %s samples have no loss token (all labels -100); they count 0 in the "
                            "%s loss", where, int(empty), int(n), name, name)
        self.empty_eval_samples = int(totals[4])

    def pools(self) -> Iterator[Batch]:
        """Pools forever, epoch after epoch (every rank gets the same number per epoch). After a
        resume the loader continues inside the saved epoch (possibly at its very end)."""
        empty_in_a_row = 0
        while True:
            got = 0
            for pool in self.loader:
                got += 1
                yield pool
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row > 1 or (got == 0 and self.resumed_from is None):
                raise RuntimeError(f"the train split under {self.config.data.local} yields no full pool of "
                                   f"{self.per_rank_pool} samples per rank")
            self.epoch += 1
            log.info("starting epoch %d", self.epoch)

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, pool: Batch, data_seconds: float) -> dict[str, float]:
        start = time.perf_counter()
        world = self.dist.world_size
        needs_target = getattr(self.selector, "needs_target", False)
        selection: Selection = self.selector.select(pool, self.target if needs_target else None)
        self.engine.reset_after_selection()
        select_seconds = time.perf_counter() - start

        rows, weights = selection.local_indices, selection.local_weights.to(torch.float32)
        if rows.numel() == 0:  # keep the engines' collectives in step: one zero-weight sample
            rows, weights = torch.zeros(1, dtype=torch.long), torch.zeros(1)
        t0 = time.perf_counter()
        if selection.pool_pass is not None and self.engine.supports_single_pass:  # no second forward
            losses = self.engine.backward_from_pass(selection.pool_pass, rows, weights, loss_scale=float(world))
        else:
            losses = self.engine.forward_backward(subset(pool, rows), weights, loss_scale=float(world))
        train_seconds = time.perf_counter() - t0

        weighted_loss = float((weights.double() * losses.double()).sum())
        local_tokens = float((pool["labels"][rows][:, 1:] != -100).sum()) if selection.local_indices.numel() else 0.0
        stop_flag = 1.0 if self.signals.received else 0.0  # rides on this all-reduce: every rank agrees
        bad_grad = 0.0 if self.engine.local_grads_finite() else 1.0
        totals = distributed.all_reduce_sum(torch.tensor(
            [weighted_loss, local_tokens, 0.0 if math.isfinite(weighted_loss) else 1.0, stop_flag, bad_grad],
            dtype=torch.float64))
        loss, tokens = float(totals[0]), float(totals[1])
        bad_loss, bad_grads = bool(totals[2] > 0), bool(totals[4] > 0)
        bad = bad_loss or bad_grads
        self._stop_requested = bool(totals[3] > 0)

        t0 = time.perf_counter()
        grad_norm = float("nan")
        if bad:
            self.engine.skip_step()
            self.skipped_steps += 1
            what = "loss" if bad_loss else "gradient (finite loss)"
            log.warning("step %d: NaN/Inf %s; optimizer step skipped, weights unchanged (%d skipped so far)",
                        self.step + 1, what, self.skipped_steps)
            if self.config.training.nan_policy == "raise" or \
                    self.skipped_steps > self.config.training.max_skipped_steps:
                raise NonFiniteLossError(f"{self.skipped_steps} steps with NaN/Inf loss or gradient (training.max_skipped_steps="
                                         f"{self.config.training.max_skipped_steps}, nan_policy="
                                         f"{self.config.training.nan_policy})")
        else:
            grad_norm = self.engine.step()
        optimizer_seconds = time.perf_counter() - t0
        step_seconds = data_seconds + (time.perf_counter() - start)

        empty = int(((pool["labels"][:, 1:] != -100).sum(dim=1) == 0).sum())
        if empty:
            if self.empty_train_samples == 0:
                log.warning("rank %d: train samples without any loss token (all labels -100) were drawn; counted in "
                            "data/empty_samples (a selected one adds no gradient)", self.dist.rank)
            self.empty_train_samples += empty
        if "truncated" in pool and bool(pool["truncated"].any()):
            if self.truncated_samples == 0:
                log.warning("rank %d: samples longer than %d tokens are cut (data.max_seq_len / the model's "
                            "max_position_embeddings); counted in data/truncated_samples", self.dist.rank,
                            self.max_seq_len)
            self.truncated_samples += int(pool["truncated"].sum())
        kind_ids = distributed.all_gather_cat(pool["kind_id"]) if "kind_id" in pool else None
        sample_ids = distributed.all_gather_cat(pool["sample_id"]) if "sample_id" in pool else None
        self.samples_seen += selection.pool_size
        metrics = {
            "train/loss": loss, "train/lr": self.engine.lr(), "train/grad_norm": grad_norm,
            "train/tokens": tokens, "train/samples": float(selection.indices.numel()),
            "train/tokens_per_second": tokens / step_seconds,
            "train/samples_per_second": selection.indices.numel() / step_seconds,
            "train/pool_samples_per_second": selection.pool_size / step_seconds,
            "train/samples_seen": float(self.samples_seen),
            "train/skipped_steps": float(self.skipped_steps),
            "data/truncated_samples": float(self.truncated_samples),
            "data/empty_samples": float(self.empty_train_samples),
            "time/step_seconds": step_seconds, "time/phase/data": data_seconds,
            "time/phase/select": select_seconds, "time/phase/train": train_seconds,
            "time/phase/optimizer": optimizer_seconds,
        }
        metrics.update(selection_metrics(selection, kind_ids, self.kind_names))
        metrics.update(_memory_metrics())
        if self._selections_file is not None and sample_ids is not None:
            record = {"step": self.step + 1, "sample_ids": sample_ids[selection.indices].tolist(),
                      "weights": [round(float(w), 6) for w in selection.weights],
                      "pool_sample_ids": sample_ids.tolist()}
            self._selections_file.write(jsonio.dumps(record) + "\n")
            self._selections_file.flush()
        return metrics

    def evaluate(self) -> EvalResult:
        return evaluate(self.engine, self.eval_batches, self.config.training.max_new_tokens, self.pad_id, self.eos_id)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, ckpt = self.config.training, self.config.checkpoint
        started = time.perf_counter()
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
            self.sinks.log({"eval/loss": self.initial_eval.loss, "eval/exact_match": self.initial_eval.exact_match},
                           step=0)
        initial = self.initial_eval
        history: list[dict[str, float]] = _logged_history(self.run_dir / "metrics.jsonl") \
            if self.resumed_from is not None and self.dist.is_main else []
        bar = None
        if cfg.progress_bar and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.num_steps, initial=self.step, desc=f"train [{self.config.selection.method}]",
                       unit="step")
        pools = self.pools()
        final = initial
        stopped = ""
        while self.step < cfg.num_steps:
            t0 = time.perf_counter()
            pool = next(pools)
            metrics = self.train_step(pool, time.perf_counter() - t0)
            self.step += 1
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.num_steps:
                final = self.evaluate()
                metrics.update({"eval/loss": final.loss, "eval/exact_match": final.exact_match})
            metrics["train/last_step_timestamp_seconds"] = time.time()
            if self._stop_requested:
                stopped = self.signals.received or "signal on another rank"
            elif cfg.stop_at_step and self.step >= cfg.stop_at_step and self.step < cfg.num_steps:
                stopped = f"training.stop_at_step={cfg.stop_at_step}"
            periodic = ckpt.every_steps and self.step % ckpt.every_steps == 0
            if stopped or periodic or (ckpt.every_steps and self.step == cfg.num_steps):
                self.save_checkpoint(stopped or "periodic")
                metrics["checkpoint/save_seconds"] = self.checkpoint_seconds["save"]
            self.sinks.log(metrics, step=self.step)
            history.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", eval=f"{final.loss:.3f}")
            if stopped:
                log.warning("stopping after step %d (%s); resume with `optsel train --resume ...`", self.step, stopped)
                break
        if bar is not None:
            bar.close()
        summary = {
            "run_dir": str(self.run_dir), "engine": self.config.engine.name,
            "method": self.config.selection.method, "world_size": self.dist.world_size,
            "num_steps": self.step, "target_steps": cfg.num_steps, "stopped": stopped or None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "checkpoint_seconds": dict(self.checkpoint_seconds),
            "pool_size": self.config.selection.pool_size,
            "budget": self.config.selection.budget, "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "initial_eval_loss": initial.loss, "final_eval_loss": final.loss,
            "initial_exact_match": initial.exact_match, "final_exact_match": final.exact_match,
            "first_train_loss": history[0]["train/loss"] if history else float("nan"),
            "last_train_loss": history[-1]["train/loss"] if history else float("nan"),
            "mean_step_seconds": sum(h["time/step_seconds"] for h in history) / max(len(history), 1),
            "wall_seconds": time.perf_counter() - started,
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(jsonio.dumps(summary, indent=2))
            plot_run(history, initial.loss, self.run_dir / "loss.png",
                     f"{self.config.selection.method} / {self.config.engine.name} / {self.dist.world_size} ranks")
        return summary

    def close(self) -> None:
        try:
            self.signals.close()
            if self._selections_file is not None:
                self._selections_file.close()
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


def _truncate_jsonl(path: Path, last_step: int) -> None:
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


def _logged_history(path: Path) -> list[dict[str, float]]:
    """Per-step metric records of steps before a resume, from metrics.jsonl (for the summary and plot)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in records
            if r.get("step", 0) >= 1 and "train/loss" in r]


def _memory_metrics() -> dict[str, float]:
    import psutil

    out = {"sys/rss_bytes": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        out["sys/cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())
    return out

