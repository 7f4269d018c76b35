"""MDS rows → the batch of docs/architecture.md (what a Selector and an Engine take)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from optsel.selection.base import Batch


def collate(samples: Sequence[dict[str, Any]], pad_id: int, max_seq_len: int | None = None) -> Batch:
    """Samples (MDS rows) → the batch of docs/architecture.md, right-padded to the longest sample.

    input_ids / attention_mask / labels: [n, T] int64 (labels -100 on prompt and padding, unshifted; a
    sample with a ``loss_mask`` column (chat data) is labelled only where it is 1);
    sample_id, kind_id: [n] int64. ``max_seq_len`` cuts longer samples; truncated: [n] bool, which were cut.
    """
    if not samples:
        raise ValueError("collate: no samples")
    full = [np.asarray(s["tokens"], dtype=np.int64) for s in samples]
    tokens = [t[:max_seq_len] for t in full]
    width = max(len(t) for t in tokens)
    n = len(samples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (toks, sample) in enumerate(zip(tokens, samples)):
        length = len(toks)
        row = torch.from_numpy(toks)
        input_ids[i, :length] = row
        attention_mask[i, :length] = 1
        mask = sample.get("loss_mask")
        if mask is None:
            start = min(int(sample["prompt_len"]), length)
            labels[i, start:length] = row[start:]
        else:  # chat samples: labels only where the per-token loss mask is 1 (assistant tokens)
            mask = np.asarray(mask)
            if mask.shape != full[i].shape:
                raise ValueError(
                    f"collate: sample {sample.get('sample_id')} has a loss_mask of shape {mask.shape} "
                    f"for {len(full[i])} tokens"
                )
            keep = torch.from_numpy(mask[:length] != 0)
            labels[i, :length] = torch.where(keep, row, torch.tensor(-100, dtype=torch.long))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_id": torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.long),
        "kind_id": torch.tensor([int(s["kind_id"]) for s in samples], dtype=torch.long),
        "truncated": torch.tensor([len(t) < len(f) for t, f in zip(tokens, full)], dtype=torch.bool),
    }
