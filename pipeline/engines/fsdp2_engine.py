"""PyTorch FSDP2 engine: ``fully_shard`` on every decoder layer, then on the root.

Parameters, gradients and the AdamW moments are DTensors sharded on dim 0 over the data-parallel
mesh (a world of 1 works too). bf16 compute with fp32 reduction via ``MixedPrecisionPolicy`` when
the precision resolves to bf16; fp32 master weights always.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial

from optsel import distributed
from optsel.pipeline.checkpoint.manager import CheckpointError
from optsel.pipeline.checkpoint.safe_load import UnsafeCheckpointError, dcp_reader_and_planner, torch_load
from optsel.pipeline.engines import shared
from optsel.pipeline.engines.muon import build_optimizer
from optsel.pipeline.engines.shared import CausalLMEngine, EngineConfig, OptimizerConfig, register_engine

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

log = logging.getLogger("optsel.engine")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: modules whose class is in the HF model's
    ``_no_split_modules`` (e.g. LlamaDecoderLayer), else the children of the largest ModuleList."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    largest = max(lists, key=len)  # its own statement: inside list(...) mypy would type it Iterable[Module]
    return list(largest)


#: FSDP2's gradient reduce-scatter dtype under bf16 compute (torchtitan's default too); benchmarks/cost_model.py
#: counts the engine's bytes with it
GRAD_REDUCE_DTYPE = torch.float32


def shard_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Apply ``fully_shard`` per decoder layer and to the root (in place; returns ``model``)."""

    kwargs: dict[str, Any] = {}
    if dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=GRAD_REDUCE_DTYPE)
    layers = decoder_layers(model)
    if not layers:
        log.warning("no decoder layers found to shard one by one; sharding only the root module")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


@register_engine("fsdp2")
class FSDP2Engine(CausalLMEngine):
    """FSDP2 data parallelism.

    ``module`` and ``unwrapped_model`` are the same sharded HF / peft model (FSDP2 shards in place;
    inside forward/backward hooks its weights are unsharded); ``optimizer`` is torch AdamW over the
    DTensor parameters (``exp_avg_sq`` etc. are DTensors with Shard(0)).
    """

    name = "fsdp2"

    def __init__(
        self, *, config: EngineConfig, model: nn.Module, optim: OptimizerConfig, total_steps: int, micro_batch_size: int
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        if config.extra:
            raise ValueError(f"engine.extra: the fsdp2 engine takes no extra options, got {sorted(config.extra)}")
        distributed.init_distributed("fsdp2", timeout_s=config.collective_timeout_s)
        self.device = shared.local_device()
        self.dtype = shared.resolve_precision(config.precision, self.device)
        self.module = shard_model(model.to(self.device), self.dtype)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no parameter requires grad")
        self.grad_clip = float(optim.grad_clip)

        self.optimizer = build_optimizer(self.module, self.params, optim)  # AdamW, or Muon + AdamW (name: muon)
        self.scheduler = shared.lr_scheduler_factory(optim, total_steps)(self.optimizer)
        self.empty_samples = shared.EmptySampleCounter()

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.module

    supports_single_pass = True

    @torch.no_grad()
    def backward_from_pass(
        self, pool_pass, rows: torch.Tensor, sample_weights: torch.Tensor, loss_scale: float
    ) -> torch.Tensor:
        """This rank's full-shape gradient of its chosen rows (fp32), summed over ranks into each
        parameter's Shard(0) gradient by a DTensor redistribute (Partial → Shard: a reduce-scatter,
        as FSDP2's own backward does). FSDP2 averages over ranks what the trainer scaled by the world
        size; the sum over ranks of the unscaled local sums is the same gradient."""

        weights = shared.check_sample_weights(sample_weights, rows.numel())
        world = distributed.info().world_size
        for p, g in pool_pass.local_grads(rows, weights, dtype=torch.float32).items():
            g = g * (loss_scale / world)
            if isinstance(p, DTensor):
                g = DTensor.from_local(g, p.device_mesh, [Partial()] * len(p.placements), run_check=False).redistribute(
                    p.device_mesh, p.placements
                )
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        return shared.pass_losses(pool_pass, rows, weights, self.empty_samples)

    def step(self) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm=max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reshard(self) -> None:
        """Re-register the sharded parameters after a forward without backward. FSDP2 never
        reshards the root after forward (backward would need it at once), so after a no-grad forward
        ``named_parameters()`` yields the root's unsharded tensors, without ``.grad`` and not the
        ones the optimizer holds. Backward reshards on its own."""
        cast("FSDPModule", self.module).reshard()  # shard_model's root: fully_shard made it an FSDPModule

    _after_forward = reshard

    @torch.no_grad()
    def local_grads_finite(self) -> bool:
        grads = [
            p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in self.params if p.grad is not None
        ]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # one device sync, not one per tensor

    def _dcp_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)  # sharded (DTensor) state dicts
        return {"model": model_sd, "optim": optim_sd}

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        """``torch.distributed.checkpoint`` of the sharded model and AdamW state (each rank writes its
        shards), plus ``engine_extra.pt`` (LR scheduler, client_state) from rank 0."""

        dcp.save(self._dcp_state(), checkpoint_id=str(path))
        if distributed.info().is_main:
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "client_state": client_state}, path / "engine_extra.pt"
            )

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        extra_file = path / "engine_extra.pt"
        if not extra_file.is_file():
            raise CheckpointError(f"checkpoint.resume: {extra_file} is missing (not an fsdp2 checkpoint?)")

        state = self._dcp_state()  # initializes the optimizer state so DCP can load into it in place
        reader, planner = dcp_reader_and_planner(path)  # .metadata and byte items without arbitrary pickle

        try:
            dcp.load(state, storage_reader=reader, planner=planner)
        except UnsafeCheckpointError:
            raise
        except (Exception, CheckpointException) as err:  # CheckpointException (a BaseException) wraps per-rank errors
            unsafe = _find_cause(err, UnsafeCheckpointError)
            if unsafe is not None:
                raise UnsafeCheckpointError(str(unsafe)) from err

            refused = re.search(r"checkpoint\.resume: .*? holds pickled objects .*?could run code\)", str(err))
            if refused:  # DCP turned the reader's error into text
                raise UnsafeCheckpointError(refused.group(0)) from err
            raise CheckpointError(
                f"checkpoint.resume: torch.distributed.checkpoint could not load {path}: {err}"
            ) from err
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch_load(extra_file, what=str(extra_file))
        self.scheduler.load_state_dict(extra["scheduler"])
        return dict(extra.get("client_state", {}))


def _find_cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain or, for DCP's
    CheckpointException, among its per-rank failures."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kind):
            return cur
        stack.extend([cur.__cause__, cur.__context__])
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):  # DCP: {rank: (exception, traceback)}
            for value in failures.values():
                stack.extend(
                    v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, BaseException)
                )
    return None
