"""FSDP2's model view for selection (selection/model_view.py): the ``Shard(0)`` moment reader, the
gather of a parameter-shaped matrix, and the reshard around the selector's passes.

FSDP2 (``fully_shard``) places parameters and their ``exp_avg`` / ``exp_avg_sq`` as DTensors
``Shard(0)`` on a 1-D mesh over all ranks; ``to_local()`` is this rank's row block (torch's chunk
rule: ceil-sized chunks, so trailing ranks may hold fewer or zero rows). The reader returns that block
and sets ``replicated = False``, so FTW all-reduces its partial results; it never communicates and
never materialises a whole moment. Before the optimizer's first step it returns the rank's block
without moments (P = I there), so that the all-reduced sums still count every element once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from optsel import distributed
from optsel.selection.model_view import ModelView, register_model_view
from optsel.selection.preconditioner import (
    ParamState,
    StateBlock,
    TorchAdamStateReader,
    adam_hyper,
    second_moment,
    shape_2d,
)

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor


def _dtensor_type() -> type[DTensor]:
    return DTensor


def dtensor_rows(param: torch.Tensor) -> slice:
    """This rank's global row range of a ``Shard(0)`` DTensor on a 1-D mesh over all ranks."""

    dtensor = cast("DTensor", param)  # FSDP2's parameters are DTensors
    mesh, placements = dtensor.device_mesh, tuple(dtensor.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise TypeError(
            f"optimizer: FSDP2 parameter with mesh shape {tuple(mesh.shape)} and placements "
            f"{placements} is not supported (only Shard(0) on a 1-D mesh: no HSDP / tensor parallel)"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh.size() != world:
        raise TypeError(
            f"optimizer: FSDP2 mesh spans {mesh.size()} of {world} ranks; the selector all-reduces "
            f"over all ranks, so the mesh must span them all"
        )
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    if local_shape[0] == 0:
        return slice(0, 0)
    return slice(int(offset[0]), int(offset[0]) + int(local_shape[0]))


class FSDP2StateReader(TorchAdamStateReader):
    """torch Adam / AdamW over FSDP2 DTensor parameters: this rank's row block (or nothing)."""

    replicated = False

    def read(self, param: torch.nn.Parameter) -> ParamState:
        group = self._group(
            param,
            " (with FSDP2: the sharded DTensor parameter must be passed; reshard the "
            "module after a forward without backward)",
        )
        if not isinstance(param, _dtensor_type()):
            raise TypeError("optimizer: FSDP2 reader got a parameter that is not a DTensor")
        rows = dtensor_rows(param)
        d0, d1 = shape_2d(param.shape)
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

    def gather_full(
        self,
        param: torch.nn.Parameter,
        pieces: Sequence[tuple[slice, slice, torch.Tensor]],
        shape: tuple[int, int],
        dtype: torch.dtype,
        wire: torch.dtype,
        comm: distributed.CommCounter | None = None,
    ) -> torch.Tensor:
        """A DTensor redistribute Shard(0) → Replicate of this rank's row block on the parameter's mesh."""
        rows = dtensor_rows(param)
        local = torch.zeros(rows.stop - rows.start, int(shape[1]), dtype=wire, device=param.device)
        for prow, pcol, value in pieces:
            local[prow.start - rows.start : prow.stop - rows.start, pcol] = value.to(wire)
        return distributed.gather_shard0(local, param, shape, comm).to(dtype)

    @staticmethod
    def _local(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        local = t.to_local() if isinstance(t, _dtensor_type()) else t
        if local.numel() != shape[0] * shape[1]:
            raise RuntimeError(
                f"optimizer: FSDP2 moment shard has {tuple(local.shape)} elements' shape, "
                f"expected rows×cols {shape} (moment not sharded like its parameter)"
            )
        return local.reshape(shape)


def _fsdp_modules(model: nn.Module | None) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if model is not None else []


class FSDP2View(ModelView):
    """FSDP2: DTensor shapes are global already; reshard before covered weights are looked up (FSDP2
    leaves the root unsharded after a forward without backward, so ``module.weight`` would not be the
    DTensor the optimizer holds) and after the selector's passes, dropping any gradient."""

    collective_forward = True

    name = "fsdp2"

    def prepare(self) -> None:
        for module in _fsdp_modules(self.model):
            module.reshard()

    def state_reader(self) -> FSDP2StateReader:
        if self.optimizer is None:
            raise TypeError("optimizer: the FSDP2 model view was built without the optimizer")
        return FSDP2StateReader(self.optimizer)

    @torch.no_grad()
    def after_selection(self) -> None:
        self.prepare()
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)

    def engine_bytes_per_step(self) -> int:
        """Every parameter all-gathered in forward and in backward at the MixedPrecisionPolicy's
        ``param_dtype`` and its gradient reduce-scattered at ``reduce_dtype`` (unset: the parameter's
        dtype); the root's skipped backward re-gather is not subtracted (an upper bound by its size)."""

        modules = _fsdp_modules(self.model)
        if self.model is None or not modules or not distributed.is_distributed():
            return super().engine_bytes_per_step()
        policy = modules[0]._get_fsdp_state()._mp_policy  # the root's; optsel shards every module alike
        total = 0
        for p in self.model.parameters():
            gather = (policy.param_dtype or p.dtype).itemsize
            grad = (policy.reduce_dtype or policy.param_dtype or p.dtype).itemsize
            total += p.numel() * (2 * gather + grad)
        return total


@register_model_view
def detect_fsdp2(model: nn.Module | None, optimizer: Any) -> FSDP2View | None:
    """FSDP2 when ``model`` holds an FSDPModule or ``optimizer`` holds DTensor parameters; FSDP1's flat
    parameters are refused."""
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    if any(type(p).__name__ == "FlatParameter" for p in params):
        raise TypeError("optimizer: FSDP1 (FlatParameter) is not supported; use FSDP2 (fully_shard) or ZeRO-3")
    if _fsdp_modules(model) or any(isinstance(p, _dtensor_type()) for p in params):
        return FSDP2View(model, optimizer)
    return None


__all__ = ["FSDP2StateReader", "FSDP2View", "detect_fsdp2", "dtensor_rows"]
