"""DeepSpeed ZeRO-3's model view for selection (selection/model_view.py): the flat-slice moment
reader, the gather of a parameter-shaped matrix, full shapes from ``ds_shape``, and the cleanup after
the selector's passes.

``deepspeed.utils.safe_get_local_optimizer_state`` gives this rank's flat slice of
``p.partition_numel()`` elements of a parameter's moment; local index i on rank r (rank in
``p.ds_process_group``) is flat index r·partition_numel + i of the row-major tensor, elements past
``ds_numel`` are padding. A slice cuts through rows: up to three blocks (partial first row, whole rows,
partial last row). β1, β2, ε and step come from the inner torch optimizer over ZeRO's fp32 flat
partitions. The reader sets ``replicated = False`` (FTW all-reduces its partial results), never
communicates and never materialises a whole moment; before the first step it returns the rank's blocks
without moments (P = I there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn

from optsel import distributed
from optsel.selection.model_view import ModelView, register_model_view
from optsel.selection.preconditioner import (
    OptimizerStateReader,
    ParamState,
    StateBlock,
    adam_hyper,
    is_adam_like,
    register_adam_like,
    shape_2d,
    unsupported_message,
)

register_adam_like("DeepSpeedCPUAdam", "FusedAdam")  # DeepSpeed's Adam kernels keep Adam's state

#: (rows, cols, local_start, local_stop): a block and where its elements sit in the local flat slice
FlatBlock = tuple[slice, slice, int, int]


class _ZeRO3Optimizer(Protocol):
    """What the reader uses of DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3``."""

    #: parameter id -> [sub-group index, offset, numel] of a trainable parameter
    grad_position: dict[int, list[int]]
    #: per sub-group: the fp32 flat partition the inner optimizer steps
    fp32_partitioned_groups_flat: list[torch.Tensor]
    #: sub-group index -> index of its param group in the inner optimizer
    sub_group_to_group_id: dict[int, int]

    def get_param_id(self, param: torch.Tensor) -> int: ...


class _ZeRO3Param(Protocol):
    """What the reader uses of a ZeRO-3 partitioned parameter (attributes DeepSpeed sets on it)."""

    ds_process_group: Any  #: the group it is partitioned over

    def partition_numel(self) -> int: ...


def flat_range_blocks(start: int, stop: int, shape: tuple[int, int]) -> list[FlatBlock]:
    """Rectangular blocks covering flat indices [start, stop) of a row-major [d0, d1] tensor
    (clipped to d0·d1: the rest is padding); local offsets are relative to ``start``. At most three
    blocks, none empty: the partial first row, the whole rows, the partial last row."""
    d0, d1 = int(shape[0]), int(shape[1])
    stop = min(stop, d0 * d1)
    out: list[FlatBlock] = []
    pos = start
    while pos < stop:
        row, col = divmod(pos, d1)
        if col != 0 or stop - pos < d1:  # a partial row
            end = min(stop, (row + 1) * d1)
            out.append((slice(row, row + 1), slice(col, col + end - pos), pos - start, end - start))
        else:  # whole rows
            nrows = (stop - pos) // d1
            end = pos + nrows * d1
            out.append((slice(row, row + nrows), slice(0, d1), pos - start, end - start))
        pos = end
    return out


def _flat_blocks(flat_m: torch.Tensor | None, flat_v: torch.Tensor | None, blocks: list[FlatBlock]) -> list[StateBlock]:
    out = []
    for rows, cols, lo, hi in blocks:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        m = flat_m[lo:hi].view(shape) if flat_m is not None else None
        v = flat_v[lo:hi].view(shape) if flat_v is not None else None
        out.append(StateBlock(rows, cols, m, v))
    return out


def _zero_stage(optimizer: object) -> str | None:
    """'stage3' / 'stage1_2' / None from the class of a DeepSpeed optimizer wrapper."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ == "DeepSpeedZeroOptimizer_Stage3":
            return "stage3"
        if cls.__name__ == "DeepSpeedZeroOptimizer":
            return "stage1_2"
    return None


def full_shape(param: torch.Tensor) -> Sequence[int]:
    """A partitioned parameter's whole shape (its local tensor is empty)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


class ZeRO3StateReader(OptimizerStateReader):
    """DeepSpeed ZeRO-3 (``engine.optimizer``) with an Adam-like inner optimizer: this rank's flat
    slice of each parameter, as up to three blocks."""

    replicated = False

    def __init__(self, optimizer: object):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not is_adam_like(inner):
            raise TypeError(unsupported_message(inner if inner is not None else optimizer))
        self.zero = cast(_ZeRO3Optimizer, optimizer)  # DeepSpeed's stage-3 optimizer (detect_zero3)
        self.inner = inner

    def read(self, param: torch.nn.Parameter) -> ParamState:
        from deepspeed.utils import safe_get_local_optimizer_state  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

        if not hasattr(param, "ds_id"):
            raise TypeError("optimizer: ZeRO-3 reader got a parameter that is not ZeRO-3 partitioned (no ds_id)")
        position = self.zero.grad_position.get(self.zero.get_param_id(param)) if param.requires_grad else None
        if position is None:
            raise KeyError("parameter is not managed by the ZeRO-3 optimizer")
        # the inner optimizer's groups hold a sub-group's fp32 flat partition only during its step
        flat = self.zero.fp32_partitioned_groups_flat[position[0]]
        group = self.inner.param_groups[self.zero.sub_group_to_group_id[position[0]]]
        state = self.inner.state.get(flat, {})
        hyper = adam_hyper(group, state)
        partitioned = cast(_ZeRO3Param, param)  # has ds_id: DeepSpeed partitioned it
        part = int(partitioned.partition_numel())
        rank = dist.get_rank(group=partitioned.ds_process_group)
        d0, d1 = shape_2d(full_shape(param))
        blocks = flat_range_blocks(rank * part, (rank + 1) * part, (d0, d1))
        if hyper.step == 0:
            return ParamState(hyper, _flat_blocks(None, None, blocks))
        m = safe_get_local_optimizer_state(param, "exp_avg")
        v_key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        v = safe_get_local_optimizer_state(param, v_key)
        for name, t in (("exp_avg", m), (v_key, v)):
            if t is None or t.numel() != part:
                raise RuntimeError(
                    f"optimizer: ZeRO-3 local {name} has {None if t is None else t.numel()} "
                    f"elements, expected partition_numel={part}"
                )
        return ParamState(hyper, _flat_blocks(m, v, blocks))

    def gather_full(
        self,
        param: torch.nn.Parameter,
        pieces: Sequence[tuple[slice, slice, torch.Tensor]],
        shape: tuple[int, int],
        dtype: torch.dtype,
        wire: torch.dtype,
        comm: distributed.CommCounter | None = None,
    ) -> torch.Tensor:
        """An all-gather of every rank's flat partition (``partition_numel`` elements each), the
        mapping the reader uses; the padding past d0·d1 is dropped."""
        partitioned = cast(_ZeRO3Param, param)  # a parameter of this ZeRO-3 model
        group = partitioned.ds_process_group
        if dist.get_world_size(group=group) != dist.get_world_size():
            raise TypeError(
                "optimizer: ZeRO-3 parameter partitioned over a subgroup is not supported by "
                "exchange='direction' (the selector gathers over all ranks)"
            )
        part, rank = int(partitioned.partition_numel()), dist.get_rank(group=group)
        d0, d1 = int(shape[0]), int(shape[1])
        flat = torch.zeros(part, dtype=wire, device=param.device)
        for prow, pcol, value in pieces:  # each block is a contiguous run of the flat slice
            start = prow.start * d1 + pcol.start - rank * part
            flat[start : start + value.numel()] = value.reshape(-1).to(wire)
        return distributed.all_gather_equal(flat, comm)[: d0 * d1].view(d0, d1).to(dtype)


class ZeRO3View(ModelView):
    """ZeRO-3: full shapes from ``ds_shape``; after the selector's passes, the optimizer's zero_grad
    (it resets ZeRO-3's micro-step counter, so the next backward overwrites its partition buffers)."""

    collective_forward = True

    name = "zero3"

    def full_shape(self, param: torch.Tensor) -> Sequence[int]:
        return full_shape(param)

    def state_reader(self) -> ZeRO3StateReader:
        return ZeRO3StateReader(self.optimizer)

    def after_selection(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)

    def engine_bytes_per_step(self) -> int:
        """Every partitioned parameter all-gathered in forward and in backward at its own dtype and its
        gradient reduce-scattered at the optimizer's ``communication_data_type``."""

        if self.model is None or not distributed.is_distributed():
            return 0
        comm = getattr(self.optimizer, "communication_data_type", None)
        total = 0
        for p in self.model.parameters():
            grad = comm.itemsize if isinstance(comm, torch.dtype) else p.element_size()
            total += int(getattr(p, "ds_numel", 0) or p.numel()) * (2 * p.element_size() + grad)
        return total


@register_model_view
def detect_zero3(model: nn.Module | None, optimizer: Any) -> ZeRO3View | None:
    """ZeRO-3 for DeepSpeed's stage-3 optimizer, or (no optimizer given) a model with partitioned
    parameters. TypeError for what selection cannot read: ZeRO-1/2, another DeepSpeed wrapper, and the
    client optimizer of a ZeRO-3 model (pass ``engine.optimizer``)."""
    stage = _zero_stage(optimizer) if optimizer is not None else None
    if stage == "stage3":
        return ZeRO3View(model, optimizer)
    if stage == "stage1_2":
        number = 2 if getattr(optimizer, "partition_gradients", False) else 1
        raise TypeError(
            f"optimizer: DeepSpeed ZeRO stage {number} ({type(optimizer).__name__}) is not supported "
            f"by geometry='adam' (its moments are flat fp32 partitions with no per-parameter "
            f"mapping); use ZeRO stage 3 or FSDP2, or geometry='sgd'"
        )
    if optimizer is not None and type(optimizer).__module__.startswith("deepspeed") and not is_adam_like(optimizer):
        raise TypeError(
            f"optimizer: DeepSpeed optimizer wrapper {type(optimizer).__name__} is not supported "
            f"(supported: ZeRO-3's DeepSpeedZeroOptimizer_Stage3); use geometry='sgd'"
        )
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    if any(hasattr(p, "ds_id") for p in params):
        raise TypeError(
            "optimizer: got an optimizer over ZeRO-3 partitioned parameters; pass DeepSpeed's own "
            "optimizer (engine.optimizer), not the client optimizer"
        )
    if optimizer is None and model is not None and any(hasattr(p, "ds_id") for p in model.parameters()):
        return ZeRO3View(model, None)
    return None


__all__ = ["ZeRO3StateReader", "ZeRO3View", "detect_zero3", "flat_range_blocks", "full_shape"]
