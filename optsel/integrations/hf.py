"""optsel inside a Hugging Face ``transformers.Trainer`` (and TRL's ``SFTTrainer``): each optimizer step
draws a pool of N candidates, an optsel selector (FTW by default) keeps ≤ k of them with weights, and the
step trains on Σ_i w_i ℓ_i (docs/design.md#the-step, docs/design.md#selection-api).

    from optsel.integrations.hf import OptselTrainer
    trainer = OptselTrainer(model=model, args=TrainingArguments(output_dir="out", max_steps=100),
                            train_dataset=train, target_dataset=target,
                            selection={"pool_size": 64, "budget": 16})   # optsel's SelectionConfig
    trainer.train()

Only public hooks are overridden: ``get_train_dataloader`` (pools), ``training_step`` (select, then train on
the chosen rows), ``log`` (selection metrics) and ``train`` (a resume also restores the selector's state,
which a callback writes into every checkpoint folder as ``SELECTOR_STATE``); the Trainer's own loop,
clipping, optimizer and LR schedule, checkpoints, evaluation and callbacks run unchanged.
``OptselTrainerMixin`` serves any Trainer subclass (``OptselSFTTrainer`` = the mixin on ``trl.SFTTrainer``,
importable when trl is installed).

Logged through ``Trainer.log`` (so to ``report_to`` and ``state.log_history``) at each training log, as
means over the steps since the previous one: ``select/*`` (selection/stats.py: selected, ess,
weight_entropy, filtered, utility_*, solver status, fallbacks), ``select/weight_max`` / ``weight_min``,
``select/single_pass``, ``time/phase/*`` (seconds: the selector's phases, and select / train / optimizer)
and ``time/overhead_ratio`` = (select + train + optimizer) / (train + optimizer).

How the sizes relate (R = ``TrainingArguments.world_size`` data-parallel ranks):
- N = ``selection.pool_size`` is the *global* pool of one optimizer step; each rank's dataloader yields
  N/R rows per step (N % R == 0). ``per_device_train_batch_size`` no longer sets how many samples a step
  sees: it is the micro-batch of the training forward/backward over the chosen rows (two-pass only).
- k = ``selection.budget`` ≤ N is the global data budget: ≤ k rows with non-zero weight per step, summed
  over ranks (each rank trains the chosen rows of its own pool).
- ``gradient_accumulation_steps`` must be 1: one pool → one selection → one optimizer step (the selector
  models the step it chooses for; bound memory with ``selection.options.ftw.capture_chunk_size`` /
  ``capture_chunk_tokens`` and ``per_device_train_batch_size`` instead).
- The target (validation) batch: the first ``selection.num_target_samples`` rows of ``target_dataset``
  (default: ``eval_dataset``; then evaluation sees those rows too), split over ranks rank::R.

The backward (docs/design.md#single-pass). On one process with no loss scaler, FTW's single pass is used: the
capture's own backward gives Σ w_i ∇ℓ_i, written into ``.grad`` by ``PoolPass.accumulate_into_grads`` (no
second forward), and the Trainer clips and steps as usual. Where the Trainer's backward must run —
data parallelism (DDP reduces gradients in hooks of its own backward, which a direct ``.grad`` write
skips) or fp16 (the GradScaler unscales what its scaled backward produced) — the step is two-pass: a
forward over the chosen rows and ``accelerator.backward`` of R · Σ_local w_i ℓ_i (DDP's gradient average
then gives Σ_global w_i g_i). DeepSpeed, FSDP, in-process DataParallel (n_gpu > 1), gradient checkpointing
and TRL's packing are refused with the argument named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from optsel.config_loader import from_mapping
from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.engines import shared
from optsel.pipeline.train.run_config import SelectionConfig, method_config
from optsel.pipeline.train.trainer import subset
from optsel.selection.base import Batch, Selection, Selector, get_selector_factory
from optsel.selection.ftw_config import FTWConfig
from optsel.selection.stats import selection_metrics

# OptselSFTTrainer too (built on first use: it needs trl)
__all__ = ["SELECTOR_STATE", "OptselTrainer", "OptselTrainerMixin", "collate_rows", "unwrap_optimizer"]

log = logging.getLogger("optsel.integrations.hf")
#: the selector's state (RNG, target cache, step counters) in each checkpoint folder, one file per rank
SELECTOR_STATE = "optsel_selector_rank{rank:05d}.pt"


# -- rows → the optsel batch ------------------------------------------------------------------------
def collate_rows(
    rows: Sequence[Mapping[str, Any]], pad_id: int, where: str, row_ids: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Tokenized rows → the optsel batch: input_ids / attention_mask / labels [n, T] int64, right-padded
    (labels unshifted, -100 on padding: the HF convention, the same as optsel's). A row without
    ``labels`` trains on every token (labels = input_ids, as TRL's and transformers' LM collators do); a
    given ``attention_mask`` is kept. row_ids [n]: dataset indices, returned as ``sample_id`` [n].
    ``where`` names the dataset in errors (with the row)."""
    if not rows:
        raise ValueError(f"{where}: no rows")
    ids, labels, masks = [], [], []
    for i, row in enumerate(rows):
        at = f"{where} row {row_ids[i] if row_ids is not None else i}"
        if not isinstance(row, Mapping) or "input_ids" not in row:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"{at}: needs tokenized 'input_ids' (and 'labels'), got {keys}")
        tensors: list[torch.Tensor] = []
        for key in ("input_ids", "labels", "attention_mask"):
            value = row.get(key, row["input_ids"] if key == "labels" else None)
            if value is None and key == "attention_mask":  # not given: all ones
                continue
            try:
                t = torch.as_tensor(value, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{at}: '{key}' must be a list of integers ({err})") from err
            if t.dim() != 1 or (key == "input_ids" and t.numel() == 0):
                raise ValueError(f"{at}: '{key}' must be a non-empty 1-D list of integers, got shape {tuple(t.shape)}")
            if tensors and t.numel() != tensors[0].numel():
                raise ValueError(f"{at}: '{key}' has {t.numel()} entries, 'input_ids' {tensors[0].numel()}")
            tensors.append(t)
        ids.append(tensors[0])
        labels.append(tensors[1])
        masks.append(tensors[2] if len(tensors) == 3 else torch.ones_like(tensors[0]))
    width = max(t.numel() for t in ids)

    def pad(ts: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.numel()), value=value) for t in ts])

    out = {"input_ids": pad(ids, int(pad_id)), "attention_mask": pad(masks, 0), "labels": pad(labels, -100)}
    if row_ids is not None:
        out["sample_id"] = torch.tensor(list(row_ids), dtype=torch.long)
    return out


class _IndexedRows(torch.utils.data.Dataset):
    """A map-style dataset whose items are (index, row): the pool remembers which dataset rows it holds."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper(s) (what FTW's
    ``geometry='adam'`` reads the moments of); any other optimizer as it is."""
    from accelerate.optimizer import AcceleratedOptimizer  # noqa: PLC0415 - optional dependency (HF Trainer integration)

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _selection_config(selection: SelectionConfig | Mapping[str, Any]) -> SelectionConfig:
    """optsel's ``selection`` block: a SelectionConfig, or a mapping of its keys (strict; ``method``
    defaults to "ftw" here)."""
    if isinstance(selection, SelectionConfig):
        return selection
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection: expected optsel's SelectionConfig or a mapping of its keys "
            f"(pool_size, budget, method, seed, num_target_samples, options), "
            f"got {type(selection).__name__}"
        )
    return from_mapping(SelectionConfig, {"method": "ftw", **selection}, "selection")


class _StepMetrics:
    """The selection metrics of the steps since the last training log, as per-key sums and counts (memory
    stays bounded whatever ``logging_steps`` is); ``current`` is the step still waiting for its optimizer time."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.current: dict[str, float] | None = None

    def start(self, record: dict[str, float]) -> None:
        self.flush()
        self.current = record

    def flush(self) -> None:
        for key, value in (self.current or {}).items():
            total = self.sums.setdefault(key, [0.0, 0.0])
            total[0] += float(value)
            total[1] += 1.0
        self.current = None

    def take(self) -> dict[str, float]:
        """Per-key means over the steps that reported the key; resets."""
        self.flush()
        means = {key: total / count for key, (total, count) in self.sums.items()}
        self.sums = {}
        return means


class _OptselCallback(transformers.TrainerCallback):
    """Times the Trainer's optimizer step (completing the step's overhead ratio) and writes the selector's
    state into each checkpoint folder the Trainer saves."""

    def __init__(self, owner: OptselTrainerMixin):
        self.owner = owner
        self.started = 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        metrics = self.owner._optsel_metrics
        record = metrics.current
        if record is not None:
            record["time/phase/optimizer"] = seconds = time.perf_counter() - self.started
            plain = record["time/phase/train"] + seconds
            record["time/overhead_ratio"] = (record["time/phase/select"] + plain) / max(plain, 1e-12)
            metrics.flush()

    def on_save(self, args, state, control, **kwargs):
        selector = self.owner.selector
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if selector is not None and os.path.isdir(folder):
            torch.save(selector.state_dict(), os.path.join(folder, SELECTOR_STATE.format(rank=args.process_index)))


# -- the mixin --------------------------------------------------------------------------------------
if TYPE_CHECKING:  # the Trainer the mixin goes before (its attributes, super()'s train and log)
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


class OptselTrainerMixin(_TrainerBase):
    """Put before a ``transformers.Trainer`` (sub)class: ``class T(OptselTrainerMixin, SFTTrainer)``.

    selection: optsel's SelectionConfig (the run YAML's ``selection:`` block) or a mapping of its keys:
    pool_size N, budget k, method ("ftw" by default for a mapping; "random", any registered selector),
    seed, num_target_samples, options ({"ftw": {...FTWConfig keys}}). target_dataset: tokenized rows
    (input_ids, labels) whose first ``num_target_samples`` form the target; None: ``eval_dataset``.
    After each step ``last_selection`` holds the step's optsel Selection (indices into the step's pool;
    the pool's ``sample_id`` are train_dataset row indices); ``selector`` is built at the first step.
    """

    def __init__(
        self, *args: Any, selection: SelectionConfig | Mapping[str, Any], target_dataset: Any = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.optsel_config = _selection_config(selection)
        self._optsel_options = method_config(self.optsel_config, self.optsel_config.method)
        self._check_optsel_args()
        self.selector: Selector | None = None
        self.last_selection: Selection | None = None
        self._optsel_metrics = _StepMetrics()
        self._optsel_single_pass = False
        self._optsel_empty = shared.EmptySampleCounter()
        # the target is checked now when given, or when the method is FTW; an eval_dataset fallback for
        # another method is read at the first step, only if that selector needs a target
        self._optsel_target_given = target_dataset
        self._optsel_target = (
            self._optsel_target_batch(target_dataset)
            if target_dataset is not None or self.optsel_config.method == "ftw"
            else None
        )
        self._optsel_resume: str | None = None
        self.add_callback(_OptselCallback(self))

    # -- checks ---------------------------------------------------------------------------------
    def _check_optsel_args(self) -> None:
        """Refuse, naming the argument, what cannot work with one selection per optimizer step."""
        args, sel = self.args, self.optsel_config
        world = int(args.world_size)
        # transformers 5 renamed gradient_checkpointing (now a mirrored, deprecated alias)
        checkpointing = (
            "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
        )
        problems = [
            (
                args.gradient_accumulation_steps != 1,
                "gradient_accumulation_steps",
                f"={args.gradient_accumulation_steps}: must be 1 with optsel (one pool of selection.pool_size → one "
                f"selection of ≤ selection.budget → one optimizer step); bound memory with selection.options.ftw."
                f"capture_chunk_size / capture_chunk_tokens and per_device_train_batch_size instead",
            ),
            (
                sel.pool_size % world != 0,
                "selection.pool_size",
                f"={sel.pool_size} must be divisible by the world size {world} (each rank draws pool_size/world rows)",
            ),
            (
                sel.num_target_samples < world,
                "selection.num_target_samples",
                f"={sel.num_target_samples} must be >= the world size {world} (every rank holds a share of the target)",
            ),
            (
                bool(getattr(self, "is_deepspeed_enabled", False)),
                "deepspeed",
                "is not supported by optsel.integrations.hf (FTW reads ZeRO-3's sharded moments through optsel's "
                "own engines): use `optsel train` with engine.name=deepspeed",
            ),
            (
                bool(getattr(self, "is_fsdp_enabled", False)),
                "fsdp",
                "is not supported by optsel.integrations.hf: use `optsel train` with engine.name=fsdp2",
            ),
            (
                int(getattr(args, "n_gpu", 1)) > 1,
                "n_gpu",
                f"={args.n_gpu}: torch.nn.DataParallel splits the pool inside one process; launch one process per "
                f"device (torchrun) instead",
            ),
            (
                bool(getattr(args, checkpointing, False)),
                checkpointing,
                f"=True: optsel's capture records every layer's input in one forward, and checkpointing's recomputed "
                f"forward would record them again; set {checkpointing}=False (TRL's SFTConfig defaults it to True)",
            ),
            (
                bool(getattr(args, "packing", False)),
                "packing",
                "=True: optsel selects and weights whole samples, and a packed row mixes several; set packing=False",
            ),
        ]
        for bad, name, message in problems:
            if bad:
                prefix = name if name.startswith("selection.") else f"{type(args).__name__}.{name}"
                raise ValueError(f"{prefix}{'' if message.startswith('=') else ' '}{message}")
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy not in ("random", "sequential") or getattr(args, "group_by_length", False):
            log.warning(
                "train_sampling_strategy=%r has no effect under optsel: pools are drawn at random "
                "('random') or in order ('sequential')",
                strategy,
            )
        for name, why in (
            ("padding_free", "pools are right-padded (each sample's own loss is what the selector weights)"),
            ("activation_offloading", "optsel's training_step replaces SFTTrainer's"),
        ):
            if getattr(args, name, False):
                log.warning("%s=True has no effect under optsel: %s", name, why)
        dataset = self.train_dataset
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            if len(dataset) < sel.pool_size:
                raise ValueError(
                    f"train_dataset: {len(dataset)} rows, fewer than selection.pool_size={sel.pool_size} "
                    f"(one pool per optimizer step)"
                )

    def _pad_id(self) -> int:
        """The tokenizer's pad id, else the model config's, else 0 (padding is masked: attention_mask 0,
        labels -100, so the id only has to be a valid token)."""
        for pad in (
            getattr(self.processing_class, "pad_token_id", None),
            getattr(getattr(self.model, "config", None), "pad_token_id", None),
        ):
            if isinstance(pad, int):
                return pad
        return 0

    def _optsel_target_batch(self, target_dataset: Any) -> dict[str, torch.Tensor] | None:
        """This rank's share of the target: rows rank::R of the first num_target_samples (on the CPU)."""
        where = "target_dataset"
        if target_dataset is None:
            target_dataset, where = self.eval_dataset, "eval_dataset (the target: no target_dataset given)"
        if target_dataset is None:
            if self.optsel_config.method == "ftw":
                raise ValueError(
                    "target_dataset: selection.method 'ftw' needs a target (validation) set: pass "
                    "target_dataset= (tokenized rows: input_ids, labels) or eval_dataset="
                )
            return None
        if isinstance(target_dataset, Mapping) and not {"input_ids"} <= set(target_dataset):
            raise ValueError(f"{where}: a dict of datasets; pass one dataset as target_dataset=")
        n = self.optsel_config.num_target_samples
        try:
            available = len(target_dataset)
        except TypeError as err:
            raise ValueError(f"{where}: needs a length (a map-style dataset or a list of rows)") from err
        if available < n:
            raise ValueError(f"{where}: {available} rows, fewer than selection.num_target_samples={n}")
        rank, world = int(self.args.process_index), int(self.args.world_size)
        rows = list(range(n))[rank::world]
        batch = collate_rows([target_dataset[i] for i in rows], self._pad_id(), where, rows)
        if int((batch["labels"][:, 1:] != -100).sum()) == 0:
            raise ValueError(
                f"{where}: none of its first {n} rows (selection.num_target_samples) has a loss token "
                f"(all labels -100 past the first position)"
            )
        return batch

    # -- data -----------------------------------------------------------------------------------
    def _optsel_collate(self, items: list) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], tuple):
            ids, rows = zip(*items)
            return collate_rows(rows, self._pad_id(), "train_dataset", list(ids))
        return collate_rows(items, self._pad_id(), "train_dataset")

    def get_train_dataloader(self) -> DataLoader:
        """Pools of N/R tokenized rows per rank and step (``selection.pool_size`` N over R ranks; shuffled
        with the run's data seed, or in order with ``train_sampling_strategy='sequential'``; the last
        incomplete pool dropped), prepared by accelerate like the Trainer's own loader."""
        if self.train_dataset is None:
            raise ValueError("train_dataset: OptselTrainer needs a train_dataset")
        dataset, args = self.train_dataset, self.args
        split = bool(getattr(self.accelerator, "split_batches", False))
        batch_size = self.optsel_config.pool_size // (1 if split else int(args.world_size))
        sampler = None
        if not isinstance(dataset, IterableDataset):
            dataset = _IndexedRows(dataset)
            seed = args.data_seed if args.data_seed is not None else args.seed
            sampler = (
                SequentialSampler(dataset)
                if getattr(args, "train_sampling_strategy", "random") == "sequential"
                else RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
            )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self._optsel_collate,
            drop_last=True,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # -- the step -------------------------------------------------------------------------------
    def _build_selector(self, model: torch.nn.Module) -> Selector:
        """The selector, once the Trainer's optimizer exists: the unwrapped model and torch optimizer."""
        if self.optimizer is None:
            raise RuntimeError("optimizer: the Trainer has not created its optimizer before the first training step")
        module = self.accelerator.unwrap_model(model)
        optimizer = unwrap_optimizer(self.optimizer)
        problem = self._single_pass_problem(model)
        options = self._optsel_options
        if isinstance(options, FTWConfig) and options.single_pass and problem:
            log.info("optsel: two-pass training step (%s)", problem)
            options = dataclasses.replace(options, single_pass=False)  # do not keep the pass it cannot use
        sel = self.optsel_config
        kwargs: dict[str, Any] = dict(
            model=module, optimizer=optimizer, budget=sel.budget, seed=sel.seed, kind_names=None
        )
        if options is not None:
            kwargs["config"] = options
        selector = get_selector_factory(sel.method)(**kwargs)
        if getattr(selector, "needs_target", False) and self._optsel_target is None:
            self._optsel_target = self._optsel_target_batch(self._optsel_target_given)
            if self._optsel_target is None:
                raise ValueError(
                    f"target_dataset: selection.method {sel.method!r} needs a target (validation) set: "
                    f"pass target_dataset= or eval_dataset="
                )
        self._optsel_single_pass = not problem
        if self._optsel_resume is not None:
            self._load_selector_state(selector, self._optsel_resume)
        return selector

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; a resumed run also restores the selector's state from the checkpoint
        (what an uninterrupted run's selector would hold at that step)."""
        resume = resume_from_checkpoint
        self._optsel_resume = (
            get_last_checkpoint(self.args.output_dir)
            if resume is True
            else str(resume)
            if resume not in (None, False)
            else None
        )
        if self.selector is not None and self._optsel_resume is not None:
            self._load_selector_state(self.selector, self._optsel_resume)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_selector_state(self, selector: Selector, checkpoint: str) -> None:
        """``selector``'s state from the checkpoint folder ``checkpoint`` (this rank's file), if there."""
        path = os.path.join(checkpoint, SELECTOR_STATE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            log.warning(
                "%s: no optsel selector state (a checkpoint written without optsel?); the selector starts fresh", path
            )
            return
        selector.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _single_pass_problem(self, model: torch.nn.Module) -> str:
        """Why FTW's single pass cannot train this Trainer's step ("" when it can)."""
        if int(self.args.world_size) > 1:
            return "data parallelism: DDP reduces gradients inside its own backward"
        if getattr(self.accelerator, "scaler", None) is not None:
            return "fp16: the GradScaler unscales what its scaled backward produced"
        if model is not self.accelerator.unwrap_model(model):
            return f"the model is wrapped ({type(model).__name__})"
        return ""

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Select ≤ k of this step's pool and accumulate the gradient of R · Σ_local w_i ℓ_i (ℓ_i: the
        sample's token-mean CE, docs/design.md#the-step; ``num_items_in_batch`` is not used). Returns the step's
        global weighted loss Σ w_i ℓ_i divided across ranks (R · local part: the Trainer averages ranks)."""
        del num_items_in_batch
        model.train()
        optimizer_train = getattr(self.optimizer, "train", None)  # schedule-free optimizers have train/eval modes
        if callable(optimizer_train):
            optimizer_train()
        if self.selector is None:
            self.selector = self._build_selector(model)
        device, world = self.args.device, int(self.args.world_size)
        pool = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        target = None
        if getattr(self.selector, "needs_target", False):
            assert self._optsel_target is not None  # _build_selector got it for a selector that needs one
            self._optsel_target = target = {key: value.to(device) for key, value in self._optsel_target.items()}
        start = time.perf_counter()
        selection: Selection = self.selector.select(pool, target)
        select_seconds = time.perf_counter() - start

        start = time.perf_counter()
        rows, weights = selection.local_indices, selection.local_weights.to(torch.float32)
        if rows.numel() == 0:  # no chosen row here: one zero-weight row keeps the ranks' backward in step
            rows, weights = torch.zeros(1, dtype=torch.long), torch.zeros(1)
        if selection.pool_pass is not None and self._optsel_single_pass:
            weights = shared.check_sample_weights(weights, rows.numel())
            selection.pool_pass.accumulate_into_grads(rows, weights, scale=float(world))
            losses = shared.pass_losses(selection.pool_pass, rows, weights, self._optsel_empty)
        else:
            losses = self._two_pass(model, pool, rows, weights, world)
        train_seconds = time.perf_counter() - start

        self.last_selection = selection
        self._optsel_metrics.start(self._step_metrics(selection, select_seconds, train_seconds))
        local = float((weights.double() * losses.double()).sum())
        return torch.tensor(world * local, dtype=torch.float32, device=device)

    def _two_pass(
        self, model: torch.nn.Module, pool: Batch, rows: torch.Tensor, weights: torch.Tensor, world: int
    ) -> torch.Tensor:
        """Forward/backward over the chosen rows, ``per_device_train_batch_size`` at a time, through the
        Trainer's model and ``accelerator.backward`` (DDP reduces once, after the last micro-batch)."""
        weights = shared.check_sample_weights(weights, rows.numel())
        micro = max(1, int(self.args.per_device_train_batch_size))
        starts = list(range(0, rows.numel(), micro))
        losses = []
        for j, s in enumerate(starts):
            part, w = rows[s : s + micro], weights[s : s + micro]
            batch = subset(pool, part.to(pool["input_ids"].device))
            last = j == len(starts) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    per_sample = per_sample_token_mean_ce(logits, batch["labels"])
                    self._optsel_empty.check(per_sample, w)
                    loss = shared.weighted_objective(per_sample.loss, w, float(world))
                self.accelerator.backward(loss)
            losses.append(per_sample.loss.detach().float().cpu())
        return torch.cat(losses)

    def _step_metrics(self, selection: Selection, select_seconds: float, train_seconds: float) -> dict[str, float]:
        """optsel's ``select/...`` metrics (selection/stats.py) plus the weights' range and the step's times."""
        out = selection_metrics(selection)
        w = selection.weights.double()
        out.update(
            {
                "select/weight_max": float(w.max()) if w.numel() else 0.0,
                "select/weight_min": float(w.min()) if w.numel() else 0.0,
                "select/single_pass": float(selection.pool_pass is not None and self._optsel_single_pass),
                "time/phase/select": select_seconds,
                "time/phase/train": train_seconds,
            }
        )
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the mean selection metrics of the steps since the last training log
        (so they reach ``report_to`` and ``state.log_history`` at ``logging_steps``)."""
        if not any(str(key).startswith("eval_") for key in logs):
            logs = {**logs, **self._optsel_metrics.take()}
        super().log(logs, *args, **kwargs)


class OptselTrainer(OptselTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with optsel's per-step selection (see the module docstring)."""


def __getattr__(name: str) -> Any:
    """``OptselSFTTrainer``: the mixin on ``trl.SFTTrainer``, built on first use (trl is optional)."""
    if name == "OptselSFTTrainer":
        try:
            from trl import SFTTrainer  # noqa: PLC0415 - optional dependency (TRL integration)
        except ImportError as err:
            raise ImportError("OptselSFTTrainer needs trl: pip install 'optsel[trl]'") from err
        cls = type(
            "OptselSFTTrainer",
            (OptselTrainerMixin, SFTTrainer),
            {
                "__doc__": "TRL's SFTTrainer with optsel's per-step selection (optsel.integrations.hf).",
                "__module__": __name__,
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
