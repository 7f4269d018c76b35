"""What FTW gathers across ranks whole: a batch (every rank's rows) and a layer's full matrix (sharded
like the weight, gathered the way the engine gathers the weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optsel import distributed
from optsel.selection.base import Batch
from optsel.selection.layers import CoveredLayer
from optsel.selection.preconditioner import LayerBlock, OptimizerStateReader

#: pad values of a batch's [n, T] tensors when ranks' T differ
_PAD = {"labels": -100}


def gather_batch(batch: Batch, comm: distributed.CommCounter | None = None) -> Batch:
    """Every rank's batch, concatenated in rank order (T right-padded to the longest: attention mask
    0, labels -100; int64 tensors cross ranks as int32 when every rank's values fit); a no-op on one
    process."""
    if not distributed.is_distributed():
        return batch
    keys = sorted(batch)
    wide_flags = [
        int(t.dtype == torch.int64 and t.numel() > 0 and not (-(2**31) <= int(t.min()) and int(t.max()) < 2**31))
        for t in (batch[k] for k in keys)
    ]
    agreed = distributed.all_reduce_max(torch.tensor([int(batch["input_ids"].shape[1]), *wide_flags]), comm)
    width, wide = int(agreed[0]), {k: bool(w) for k, w in zip(keys, agreed[1:].tolist())}
    out = {}
    for key in keys:
        t = batch[key]
        if t.dim() >= 2 and t.shape[1] != width:
            t = F.pad(t, (0, width - t.shape[1]), value=_PAD.get(key, 0))
        narrow = t.dtype == torch.int64 and not wide[key]
        gathered = distributed.all_gather_cat(t.to(torch.int32) if narrow else t, comm)
        out[key] = gathered.to(t.dtype)
    return out


def _param_layout(layer: CoveredLayer, blk: LayerBlock, value: torch.Tensor) -> tuple[slice, slice, torch.Tensor]:
    if layer.transposed:
        return blk.cols, blk.rows, value.T
    return blk.rows, blk.cols, value


def full_matrix(
    reader: OptimizerStateReader,
    layer: CoveredLayer,
    blocks: list[LayerBlock],
    values: list[torch.Tensor],
    dtype: torch.dtype,
    wire: torch.dtype,
    comm: distributed.CommCounter | None = None,
) -> torch.Tensor:
    """The whole [d_out, d_in] matrix (layer convention) whose values on this rank's ``blocks`` are
    ``values``, gathered by the reader the way the engine shards the weight; ``wire``: the dtype that
    crosses ranks (a replicated reader assembles it locally)."""
    shape = (layer.d_in, layer.d_out) if layer.transposed else (layer.d_out, layer.d_in)  # parameter layout
    pieces = [_param_layout(layer, blk, value) for blk, value in zip(blocks, values)]
    full = reader.gather_full(layer.param, pieces, shape, dtype, wire, comm)
    return full.T.contiguous() if layer.transposed else full


__all__ = ["full_matrix", "gather_batch"]
