"""The Trainer: one step of optsel, top to bottom.

draw a pool (every rank the same count) → ``selector.select(pool, target)`` → train on this rank's
selected samples with their global weights (loss scaled by the world size, so the engine's gradient
average is Σ_i w_i g_i over the global selection) → optimizer step → metrics to every sink.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from optsel import __version__, distributed
from optsel.launch.config_loader import ConfigError, dump_yaml
from optsel.launch.run_config import RunConfig, method_config
from optsel.monitoring.sinks import MultiSink, build_sinks
from optsel.pipeline import data as data_lib
from optsel.pipeline.engines.base import Batch, build_engine
from optsel.pipeline.evaluate import EvalResult, evaluate
from optsel.pipeline.model import build_model
from optsel.pipeline.plots import plot_run
from optsel.pipeline.tokenizer import load_tokenizer
from optsel.selection.base import Selection, get_selector_factory
from optsel.selection.stats import selection_metrics

log = logging.getLogger("optsel.train")


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


def build_selector(config: RunConfig, model, optimizer):
    """The configured selector, with its typed options block (see ``SelectionConfig.options``)."""
    sel = config.selection
    kwargs: dict[str, Any] = dict(model=model, optimizer=optimizer, budget=sel.budget, seed=sel.seed)
    typed = method_config(sel, sel.method)
    if typed is not None:
        kwargs["config"] = typed
    return get_selector_factory(sel.method)(**kwargs)


class Trainer:
    """Owns the engine, the selector, the data and the sinks for one run."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.dist = distributed.init_distributed(config.engine.name, timeout_s=config.engine.collective_timeout_s)
        config.validate_for_world(self.dist.world_size)
        torch.manual_seed(config.training.seed)
        self.run_dir = config.run_dir
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
        self.selector = build_selector(config, self.engine.unwrapped_model, self.engine.optimizer)
        if self.dist.is_main:
            log.info("run %s: engine %s on %s (%s, backend %s), world size %d, selector %s, pool %d, budget %d",
                     config.run_name, config.engine.name, self.engine.device,
                     str(getattr(self.engine, "dtype", "")).replace("torch.", ""), distributed.default_backend(),
                     self.dist.world_size, config.selection.method, config.selection.pool_size,
                     config.selection.budget)

        self.loader = data_lib.build_train_loader(config.data, self.per_rank_pool, self.dist)
        self.target, self.eval_batches = self._held_out_batches()
        self.sinks = MultiSink(build_sinks(config.monitoring, run_dir=self.run_dir, rank=self.dist.rank,
                                           local_rank=self.dist.local_rank, world_size=self.dist.world_size,
                                           engine=config.engine.name, method=config.selection.method))
        self.sinks.log_info({"version": __version__, "engine": config.engine.name,
                             "method": config.selection.method, "world_size": str(self.dist.world_size)})
        self.step = 0
        self.skipped_steps = 0
        self.samples_seen = 0
        self._selections_file = (self.run_dir / "selections.jsonl").open("a") if self.dist.is_main else None

    # -- data -----------------------------------------------------------------------------------
    def _held_out_batches(self) -> tuple[Batch, list[Batch]]:
        """This rank's share of the target (selection) samples and of the evaluation samples."""
        sel, train = self.config.selection, self.config.training
        rank, world = self.dist.rank, self.dist.world_size
        val = data_lib.load_split(self.config.data, "val")
        needed = sel.num_target_samples + train.num_eval_samples
        if len(val) < needed:
            raise ConfigError("training.num_eval_samples",
                              f"the val split has {len(val)} samples, fewer than num_target_samples + "
                              f"num_eval_samples = {needed}")
        target_rows = list(range(sel.num_target_samples))[rank::world]
        eval_rows = list(range(sel.num_target_samples, needed))
        eval_rows = eval_rows[: len(eval_rows) // world * world][rank::world]  # same count on every rank
        target = data_lib.collate([val[i] for i in target_rows], self.pad_id)
        eval_batches = [data_lib.collate([val[i] for i in eval_rows[j:j + 32]], self.pad_id)
                        for j in range(0, len(eval_rows), 32)]
        return target, eval_batches

    def pools(self) -> Iterator[Batch]:
        """Pools forever, epoch after epoch (every rank gets the same number per epoch)."""
        epoch = 0
        while True:
            got = 0
            for pool in self.loader:
                got += 1
                yield pool
            if got == 0:
                raise RuntimeError(f"the train split under {self.config.data.local} yields no full pool of "
                                   f"{self.per_rank_pool} samples per rank")
            epoch += 1
            log.info("starting epoch %d", epoch)

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
        batch = subset(pool, rows)
        t0 = time.perf_counter()
        losses = self.engine.forward_backward(batch, weights, loss_scale=float(world))
        train_seconds = time.perf_counter() - t0

        weighted_loss = float((weights.double() * losses.double()).sum())
        local_tokens = float((batch["labels"][:, 1:] != -100).sum()) if selection.local_indices.numel() else 0.0
        totals = distributed.all_reduce_sum(torch.tensor(
            [weighted_loss, local_tokens, 0.0 if math.isfinite(weighted_loss) else 1.0], dtype=torch.float64))
        loss, tokens, bad = float(totals[0]), float(totals[1]), totals[2] > 0

        t0 = time.perf_counter()
        grad_norm = float("nan")
        if bad:
            self.engine.skip_step()
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss; step skipped (%d so far)", self.step + 1, self.skipped_steps)
            if self.config.training.nan_policy == "raise" or \
                    self.skipped_steps > self.config.training.max_skipped_steps:
                raise NonFiniteLossError(f"{self.skipped_steps} steps with NaN/Inf loss (training.max_skipped_steps="
                                         f"{self.config.training.max_skipped_steps}, nan_policy="
                                         f"{self.config.training.nan_policy})")
        else:
            grad_norm = self.engine.step()
        optimizer_seconds = time.perf_counter() - t0
        step_seconds = data_seconds + (time.perf_counter() - start)

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
            self._selections_file.write(json.dumps(record) + "\n")
            self._selections_file.flush()
        return metrics

    def evaluate(self) -> EvalResult:
        return evaluate(self.engine, self.eval_batches, self.config.training.max_new_tokens, self.pad_id, self.eos_id)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.config.training
        started = time.perf_counter()
        initial = self.evaluate()
        self.sinks.log({"eval/loss": initial.loss, "eval/exact_match": initial.exact_match}, step=0)
        history: list[dict[str, float]] = []
        bar = None
        if cfg.progress_bar and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.num_steps, desc=f"train [{self.config.selection.method}]", unit="step")
        pools = self.pools()
        final = initial
        while self.step < cfg.num_steps:
            t0 = time.perf_counter()
            pool = next(pools)
            metrics = self.train_step(pool, time.perf_counter() - t0)
            self.step += 1
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.num_steps:
                final = self.evaluate()
                metrics.update({"eval/loss": final.loss, "eval/exact_match": final.exact_match})
            metrics["train/last_step_timestamp_seconds"] = time.time()
            self.sinks.log(metrics, step=self.step)
            history.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", eval=f"{final.loss:.3f}")
        if bar is not None:
            bar.close()
        summary = {
            "run_dir": str(self.run_dir), "engine": self.config.engine.name,
            "method": self.config.selection.method, "world_size": self.dist.world_size,
            "num_steps": self.step, "pool_size": self.config.selection.pool_size,
            "budget": self.config.selection.budget, "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "initial_eval_loss": initial.loss, "final_eval_loss": final.loss,
            "initial_exact_match": initial.exact_match, "final_exact_match": final.exact_match,
            "first_train_loss": history[0]["train/loss"], "last_train_loss": history[-1]["train/loss"],
            "mean_step_seconds": sum(h["time/step_seconds"] for h in history) / len(history),
            "wall_seconds": time.perf_counter() - started,
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_run(history, initial.loss, self.run_dir / "loss.png",
                     f"{self.config.selection.method} / {self.config.engine.name} / {self.dist.world_size} ranks")
        return summary

    def close(self) -> None:
        if self._selections_file is not None:
            self._selections_file.close()
        self.sinks.close()
        self.engine.close()


def _memory_metrics() -> dict[str, float]:
    import psutil

    out = {"sys/rss_bytes": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        out["sys/cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())
    return out

