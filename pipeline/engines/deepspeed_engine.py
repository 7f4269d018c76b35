"""DeepSpeed ZeRO-3 engine.

The DeepSpeed JSON (``EngineConfig.deepspeed_config``) says how to shard (stage 3, buckets, offload);
optsel owns everything that must agree with the run config and fills it here: batch sizes,
gradient accumulation (1: the trainer does one weighted backward per step), gradient clipping,
precision, the optimizer (a client AdamW built from ``OptimizerConfig``) and the LR schedule.
Those keys must be absent or ``"auto"`` in the JSON; other ``"auto"`` values are sized from the
model's hidden size the way Hugging Face's integration does.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from optsel import distributed
from optsel.pipeline.checkpoint.manager import CheckpointError
from optsel.pipeline.checkpoint.safe_load import UnsafeCheckpointError, deepspeed_safe_globals, torch_load
from optsel.pipeline.engines import shared
from optsel.pipeline.engines.muon import MUON_REFUSAL
from optsel.pipeline.engines.shared import CausalLMEngine, EngineConfig, OptimizerConfig, register_engine
from optsel.pipeline.files import jsonio

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine as DeepSpeedRuntimeEngine

log = logging.getLogger("optsel.engine")

#: top-level keys that optsel fills from the run config (JSON value must be absent or "auto")
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON; errors name the file."""
    return jsonio.read_object(
        Path(path),
        ValueError,
        f"engine.deepspeed_config: {path} does not exist",
        f"engine.deepspeed_config: {path} is not valid",
        missing_error=FileNotFoundError,
    )


def _auto_sizes(hidden_size: int) -> dict[str, int]:
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def fill_ds_config(
    raw: dict[str, Any],
    *,
    source: str,
    micro_batch_size: int,
    world_size: int,
    optim: OptimizerConfig,
    dtype: torch.dtype,
    hidden_size: int | None,
) -> dict[str, Any]:
    """The DeepSpeed config to run: ``raw`` plus optsel's batch sizes, clipping, precision and the
    resolved ``"auto"`` bucket sizes. ``source`` names the file in errors."""
    cfg = copy.deepcopy(raw)
    for key in OWNED_KEYS:
        if key in cfg and cfg[key] != "auto":
            raise ValueError(
                f"engine.deepspeed_config: {source} sets '{key}'; optsel fills it from the run config "
                f'(optimizer/selection blocks), so remove it or set it to "auto"'
            )
        cfg.pop(key, None)
    for block in ("bf16", "fp16"):
        enabled = cfg.get(block, {}).get("enabled", "auto")
        if enabled not in ("auto", False):
            raise ValueError(
                f"engine.deepspeed_config: {source} sets '{block}.enabled'; choose the precision with "
                f'engine.precision instead (remove it or set it to "auto")'
            )
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        raise ValueError(
            f"engine.deepspeed_config: {source} has zero_optimization.stage={zero.get('stage')}; "
            f"the deepspeed engine runs ZeRO stage 3"
        )
    zero["stage"] = 3
    for key, value in _auto_sizes(hidden_size or 0).items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ValueError(
                    f'engine.deepspeed_config: {source} has zero_optimization.{key}="auto" but the '
                    f"model has no config.hidden_size to size it from; set a number"
                )
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ValueError(f'engine.deepspeed_config: {source} has "auto" values optsel cannot fill: {leftover}')
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=micro_batch_size * world_size,
        gradient_clipping=float(optim.grad_clip),
    )
    cfg["bf16"] = {
        **{k: v for k, v in cfg.get("bf16", {}).items() if k != "enabled"},
        "enabled": dtype == torch.bfloat16,
    }
    cfg["fp16"] = {"enabled": False}
    return cfg


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def build_client_optimizer(
    params: list[nn.Parameter], optim: OptimizerConfig, cpu_offload: bool
) -> torch.optim.Optimizer:
    """AdamW from the run's optimizer block: DeepSpeedCPUAdam (AdamW mode) when the optimizer is
    offloaded to CPU (DeepSpeed requires it there), else torch.optim.AdamW."""
    kwargs: dict[str, Any] = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


@register_engine("deepspeed")
class DeepSpeedEngine(CausalLMEngine):
    """ZeRO-3 data parallelism via ``deepspeed.initialize``.

    ``module`` is the DeepSpeedEngine (call it like the model); ``unwrapped_model`` is the HF /
    peft model inside it (ZeRO-3 partitioned parameters; hooks on its submodules see gathered
    weights); ``optimizer`` is DeepSpeed's ZeRO-3 optimizer (AdamW state via
    ``deepspeed.utils.safe_get_local_optimizer_state``).
    """

    name = "deepspeed"
    module: DeepSpeedRuntimeEngine

    def __init__(
        self, *, config: EngineConfig, model: nn.Module, optim: OptimizerConfig, total_steps: int, micro_batch_size: int
    ):
        import deepspeed  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

        if getattr(optim, "name", "adamw") == "muon":
            raise ValueError(MUON_REFUSAL)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        dist_info = distributed.init_distributed("deepspeed", timeout_s=config.collective_timeout_s)
        self.device = shared.local_device()
        self.dtype = shared.resolve_precision(config.precision, self.device)
        hf_config = shared.hf_config_of(model)
        raw = {**load_ds_config(config.deepspeed_config), **config.extra}  # extra: top-level DS keys
        source = str(config.deepspeed_config) + (" + engine.extra" if config.extra else "")
        self.ds_config = fill_ds_config(
            raw,
            source=source,
            micro_batch_size=micro_batch_size,
            world_size=dist_info.world_size,
            optim=optim,
            dtype=self.dtype,
            hidden_size=getattr(hf_config, "hidden_size", None),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: no parameter requires grad")
        client_optimizer = build_client_optimizer(params, optim, offloads_optimizer(self.ds_config))
        # DeepSpeed 0.19's ZeRO collectives call torch's deprecated aliases on every step (one warning each)
        for alias in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            shared.quiet_known_warning(
                rf"`?torch\.distributed\.{alias}`? is deprecated", FutureWarning, r"torch\.distributed\.c10d_logger"
            )
        engine, ds_optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_optimizer,
            lr_scheduler=shared.lr_scheduler_factory(optim, total_steps),
            config=self.ds_config,
        )
        self.module = engine
        self.optimizer = ds_optimizer
        self.scheduler = scheduler
        self.empty_samples = shared.EmptySampleCounter()

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.module.module

    def _backward(self, objective: torch.Tensor) -> None:
        self.module.backward(objective)

    supports_single_pass = True

    def backward_from_pass(
        self, pool_pass, rows: torch.Tensor, sample_weights: torch.Tensor, loss_scale: float
    ) -> torch.Tensor:
        """DeepSpeed's own backward on a surrogate with the same parameter gradient (each leaf module
        called on its recorded input of the chosen rows: ZeRO-3 gathers, reduce-scatters, clips and
        checks overflow as in any backward; no forward through the model)."""
        weights = shared.check_sample_weights(sample_weights, rows.numel())
        self.module.train()
        self.module.backward(pool_pass.surrogate_loss(rows, weights, scale=loss_scale))
        return shared.pass_losses(pool_pass, rows, weights, self.empty_samples)

    def step(self) -> float:
        self.module.step()  # clip (gradient_clipping), AdamW, LR schedule, zero grads
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        # ZeRO-3 keeps reduced grads in partition buffers, not in p.grad; the optimizer's zero_grad
        # resets its micro-step counter so the next backward overwrites them instead of adding.
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad()

    @torch.no_grad()
    def local_grads_finite(self) -> bool:
        """ZeRO-3 keeps this rank's reduced gradient partition in one flat buffer (DeepSpeed only
        checks it itself under fp16 loss scaling)."""
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        if flat is None:
            if not getattr(self, "_warned_no_flat_grads", False):
                log.warning(
                    "DeepSpeed optimizer has no grad_partitions_flat_buffer (offload?): "
                    "non-finite gradients are not detected before the step"
                )
                self._warned_no_flat_grads = True
            return True
        return bool(torch.isfinite(flat).all())

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed's own format under ``path`` (its tag folder): ZeRO-3 model/optimizer partitions
        per rank, the LR scheduler, ``client_state``."""
        ok = self.module.save_checkpoint(
            str(path.parent), tag=path.name, client_state={"optsel": client_state}, save_latest=False
        )
        if ok is False:
            raise RuntimeError(f"DeepSpeed save_checkpoint into {path} failed")

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume: {path} is missing")

        allowed = deepspeed_safe_globals()
        ckpt_engine = self.module.checkpoint_engine
        unsafe_load = ckpt_engine.load  # torch.load(weights_only=False): a replaced file would run code

        def weights_only_load(file: str, map_location=None):
            return torch_load(file, what=str(file), allowed=allowed, map_location=map_location)

        ckpt_engine.load = weights_only_load
        try:
            loaded, client = self.module.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except UnsafeCheckpointError:
            raise
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint.resume: DeepSpeed could not load {path}: {err}") from err
        finally:
            ckpt_engine.load = unsafe_load
        if loaded is None:
            raise CheckpointError(f"checkpoint.resume: DeepSpeed found no checkpoint in {path}")
        return dict((client or {}).get("optsel", {}))

    def close(self) -> None:
        destroy = getattr(self.module, "destroy", None)
        if callable(destroy):
            destroy()
