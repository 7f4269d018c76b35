"""The held-out samples of a run: this rank's share of the target (selection) samples and of the
evaluation samples, both from the front of the val split, checked for loss tokens."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from optsel import distributed
from optsel.config_loader import ConfigError
from optsel.pipeline.data import loaders as data_lib
from optsel.selection.base import Batch

if TYPE_CHECKING:  # run_config imports nothing from here; annotations only
    from optsel.pipeline.train.run_config import RunConfig

log = logging.getLogger("optsel.train")


def held_out_batches(
    config: RunConfig, dist: distributed.DistInfo, pad_id: int, max_seq_len: int | None, vocab_size: int
) -> tuple[Batch, list[Batch], int]:
    """(target batch, eval batches, eval samples without a loss token over all ranks) of this rank.
    ``config`` is the RunConfig; collective (every rank calls it)."""
    sel, train = config.selection, config.training
    rank, world = dist.rank, dist.world_size
    val = data_lib.load_split(config.data, "val", vocab_size=vocab_size)
    needed = sel.num_target_samples + train.num_eval_samples
    if len(val) < needed:
        raise ConfigError(
            "training.num_eval_samples",
            f"the val split has {len(val)} samples, fewer than num_target_samples + num_eval_samples = {needed}",
        )
    target_rows = list(range(sel.num_target_samples))[rank::world]
    eval_rows = data_lib.share_of(val[sel.num_target_samples : needed], rank, world)  # same count on every rank
    target = data_lib.collate([val[i] for i in target_rows], pad_id, max_seq_len)
    eval_batches = data_lib.batches_of(eval_rows, pad_id, max_seq_len)
    empty_eval = check_loss_tokens(config, dist, target, eval_batches, max_seq_len)
    return target, eval_batches, empty_eval


def check_loss_tokens(
    config: RunConfig, dist: distributed.DistInfo, target: Batch, eval_batches: list[Batch], max_seq_len: int | None
) -> int:
    """Refuse a target or eval split in which no sample has a loss token (every label -100: the
    eval loss would read 0.0, which looks perfect); count and warn for single such samples. Returns
    the number of eval samples without a loss token (all ranks)."""

    def counts(batches: list[Batch]) -> list[float]:
        per_sample = [(b["labels"][:, 1:] != -100).sum(dim=1) for b in batches]
        flat = torch.cat(per_sample) if per_sample else torch.zeros(0, dtype=torch.long)
        return [float(flat.numel()), float((flat == 0).sum()), float(flat.sum())]

    totals = distributed.all_reduce_sum(torch.tensor(counts([target]) + counts(eval_batches), dtype=torch.float64))
    sel, train = config.selection, config.training
    where = f"the val split under {config.data.remote or config.data.local}"
    for name, (n, empty, tokens), rows in (
        ("target", totals[:3].tolist(), f"rows 0-{sel.num_target_samples - 1}, selection.num_target_samples"),
        (
            "eval",
            totals[3:].tolist(),
            f"rows {sel.num_target_samples}-"
            f"{sel.num_target_samples + train.num_eval_samples - 1}, "
            f"training.num_eval_samples",
        ),
    ):
        if n > 0 and tokens == 0:
            raise data_lib.ShardError(
                f"{where}: every one of its {int(n)} {name} samples ({rows}) has no loss token (all labels -100, "
                f"e.g. prompt_len == length{' or cut by data.max_seq_len' if max_seq_len else ''}); its loss "
                f"would read 0.0. Re-prepare the data with answers"
            )
        if empty and dist.is_main:
            log.warning(
                "%s: %d of %d %s samples have no loss token (all labels -100); they count 0 in the %s loss",
                where,
                int(empty),
                int(n),
                name,
                name,
            )
    return int(totals[4])
