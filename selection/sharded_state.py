"""Optimizer-state readers for sharded moments (docs/design.md §4): FSDP2 and DeepSpeed ZeRO-3.

Both return only this rank's part of a parameter's Adam moments as :class:`StateBlock`s of the
parameter's 2-D layout and set ``replicated = False``, so FTW all-reduces its partial results.
Neither does any communication, and neither ever materializes a whole moment tensor:

- FSDP2 (``fully_shard``): parameters and ``exp_avg`` / ``exp_avg_sq`` are DTensors placed
  ``Shard(0)`` on a 1-D mesh over all ranks; ``to_local()`` is this rank's row block (torch's
  chunk rule: ceil-sized chunks, so trailing ranks may hold fewer or zero rows).
- ZeRO-3: ``deepspeed.utils.safe_get_local_optimizer_state`` gives this rank's flat slice of
  ``p.partition_numel()`` elements; local index i on rank r (rank in ``p.ds_process_group``) is flat
  index r·partition_numel + i of the row-major tensor, elements past ``ds_numel`` are padding. A
  slice cuts through rows: up to three blocks (partial first row, whole rows, partial last row).
  β1, β2, ε and step come from the inner torch optimizer over ZeRO's fp32 flat partitions.

Before the optimizer's first step the readers return this rank's blocks without moments (P = I on
them), so that the all-reduced sums still count every element exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from optsel.selection.preconditioner import (OptimizerStateReader, ParamState, StateBlock, TorchAdamStateReader,
                                             adam_hyper, is_adam_like, second_moment, shape_2d, unsupported_message)

#: (rows, cols, local_start, local_stop): a block and where its elements sit in the local flat slice
FlatBlock = tuple[slice, slice, int, int]


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


def _flat_blocks(flat_m: torch.Tensor | None, flat_v: torch.Tensor | None,
                 blocks: list[FlatBlock]) -> list[StateBlock]:
    out = []
    for rows, cols, lo, hi in blocks:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        m = flat_m[lo:hi].view(shape) if flat_m is not None else None
        v = flat_v[lo:hi].view(shape) if flat_v is not None else None
        out.append(StateBlock(rows, cols, m, v))
    return out


# ---------------------------------------------------------------------------------------------- FSDP2

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch >= 2.4 has it
        return None
    return DTensor


def dtensor_rows(param: torch.Tensor) -> slice:
    """This rank's global row range of a ``Shard(0)`` DTensor on a 1-D mesh over all ranks."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise TypeError(f"optimizer: FSDP2 parameter with mesh shape {tuple(mesh.shape)} and placements "
                        f"{placements} is not supported (only Shard(0) on a 1-D mesh: no HSDP / tensor parallel)")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh.size() != world:
        raise TypeError(f"optimizer: FSDP2 mesh spans {mesh.size()} of {world} ranks; the selector all-reduces "
                        f"over all ranks, so the mesh must span them all")
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    if local_shape[0] == 0:
        return slice(0, 0)
    return slice(int(offset[0]), int(offset[0]) + int(local_shape[0]))


class FSDP2StateReader(TorchAdamStateReader):
    """torch Adam / AdamW over FSDP2 DTensor parameters: this rank's row block (or nothing)."""

    replicated = False

    def read(self, param: torch.nn.Parameter) -> ParamState:
        group = self._group(param, " (with FSDP2: the sharded DTensor parameter must be passed; reshard the "
                                   "module after a forward without backward)")
        DTensor = _dtensor_type()
        if not isinstance(param, DTensor):
            raise TypeError("optimizer: FSDP2 reader got a parameter that is not a DTensor")
        rows = dtensor_rows(param)
        d0, d1 = shape_2d(param)
        cols = slice(0, d1)
        state = self.optimizer.state.get(param, {})
        hyper = adam_hyper(group, state)
        if rows.stop == rows.start:
            return ParamState(hyper, [])
        if hyper.step == 0:
            return ParamState(hyper, [StateBlock(rows, cols, None, None)])
        shape = (rows.stop - rows.start, d1)
        m, v = (self._local(t, shape) for t in (state["exp_avg"], second_moment(group, state)))
        return ParamState(hyper, [StateBlock(rows, cols, m, v)])

    @staticmethod
    def _local(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        local = t.to_local() if isinstance(t, _dtensor_type()) else t
        if local.numel() != shape[0] * shape[1]:
            raise RuntimeError(f"optimizer: FSDP2 moment shard has {tuple(local.shape)} elements' shape, "
                               f"expected rows×cols {shape} (moment not sharded like its parameter)")
        return local.reshape(shape)


# ---------------------------------------------------------------------------------------------- ZeRO-3

def _is_deepspeed_zero_optimizer(optimizer: object) -> str | None:
    """'stage3' / 'stage1_2' / None from the class of a DeepSpeed optimizer wrapper."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ == "DeepSpeedZeroOptimizer_Stage3":
            return "stage3"
        if cls.__name__ == "DeepSpeedZeroOptimizer":
            return "stage1_2"
    return None


class ZeRO3StateReader(OptimizerStateReader):
    """DeepSpeed ZeRO-3 (``engine.optimizer``) with an Adam-like inner optimizer: this rank's flat
    slice of each parameter, as up to three blocks."""

    replicated = False

    def __init__(self, optimizer: object):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not is_adam_like(inner):
            raise TypeError(unsupported_message(inner if inner is not None else optimizer))
        self.zero = optimizer
        self.inner = inner

    def read(self, param: torch.nn.Parameter) -> ParamState:
        from deepspeed.utils import safe_get_local_optimizer_state

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
        part = int(param.partition_numel())
        rank = dist.get_rank(group=param.ds_process_group)
        blocks = flat_range_blocks(rank * part, (rank + 1) * part, tuple(shape_2d(param)))
        if hyper.step == 0:
            return ParamState(hyper, _flat_blocks(None, None, blocks))
        m = safe_get_local_optimizer_state(param, "exp_avg")
        v_key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        v = safe_get_local_optimizer_state(param, v_key)
        for name, t in (("exp_avg", m), (v_key, v)):
            if t is None or t.numel() != part:
                raise RuntimeError(f"optimizer: ZeRO-3 local {name} has {None if t is None else t.numel()} "
                                   f"elements, expected partition_numel={part}")
        return ParamState(hyper, _flat_blocks(m, v, blocks))


# ---------------------------------------------------------------------------------------------- choice

def reader_for(optimizer: object) -> OptimizerStateReader | None:
    """The sharded reader ``optimizer`` needs, None for an unsharded one; TypeError for a sharded
    setup that is not supported (ZeRO-1/2, FSDP1 flat parameters, other DeepSpeed wrappers)."""
    kind = _is_deepspeed_zero_optimizer(optimizer)
    if kind == "stage3":
        return ZeRO3StateReader(optimizer)
    if kind == "stage1_2":
        stage = 2 if getattr(optimizer, "partition_gradients", False) else 1
        raise TypeError(f"optimizer: DeepSpeed ZeRO stage {stage} ({type(optimizer).__name__}) is not supported "
                        f"by geometry='adam' (its moments are flat fp32 partitions with no per-parameter "
                        f"mapping); use ZeRO stage 3 or FSDP2, or geometry='sgd'")
    if type(optimizer).__module__.startswith("deepspeed") and not is_adam_like(optimizer):
        raise TypeError(f"optimizer: DeepSpeed optimizer wrapper {type(optimizer).__name__} is not supported "
                        f"(supported: ZeRO-3's DeepSpeedZeroOptimizer_Stage3); use geometry='sgd'")
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    if any(type(p).__name__ == "FlatParameter" for p in params):
        raise TypeError("optimizer: FSDP1 (FlatParameter) is not supported; use FSDP2 (fully_shard) or ZeRO-3")
    if any(hasattr(p, "ds_id") for p in params):
        raise TypeError("optimizer: got an optimizer over ZeRO-3 partitioned parameters; pass DeepSpeed's own "
                        "optimizer (engine.optimizer), not the client optimizer")
    DTensor = _dtensor_type()
    if DTensor is not None and any(isinstance(p, DTensor) for p in params):
        return FSDP2StateReader(optimizer)  # type: ignore[arg-type]
    return None


__all__ = ["FSDP2StateReader", "ZeRO3StateReader", "flat_range_blocks", "dtensor_rows", "reader_for"]
