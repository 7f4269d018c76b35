"""The Engine seam: how the trainer drives a distributed training backend.

An engine owns the (sharded) model, its optimizer and LR schedule. The trainer only calls the verbs
below; everything engine-specific (ZeRO-3 partitioning, FSDP2 ``fully_shard``, mixed precision,
gradient clipping, checkpoint formats) stays inside the implementation.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from optsel.selection.base import Batch  # noqa: F401  (the one batch type; re-exported)


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW (or Muon + AdamW: ``name: muon``, pipeline/engines/muon.py) and its schedule. lr in units of
    the parameter, warmup/decay in optimizer steps; the schedule scales muon_lr like lr."""

    #: adamw: AdamW on every parameter; muon: torch.optim.Muon on the hidden 2-D weights, AdamW on the rest
    name: Literal["adamw", "muon"] = "adamw"

    lr: float = 3e-4  #: peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  #: AdamW's β1, β2
    eps: float = 1e-8  #: AdamW's ε
    weight_decay: float = 0.0  #: AdamW's decoupled weight decay
    grad_clip: float = 1.0  #: clip the global gradient norm to this (0: no clipping)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"  #: learning-rate decay after warmup
    warmup_steps: int = 0  #: linear warmup from 0 over this many optimizer steps
    min_lr_ratio: float = 0.1  #: the decay ends at lr * min_lr_ratio
    muon_lr: float = 0.02  #: name muon: Muon's peak learning rate
    muon_momentum: float = 0.95  #: name muon: Muon's momentum μ
    muon_nesterov: bool = True  #: name muon: Nesterov momentum (Newton–Schulz sees μ²B + (1−μ²)g)
    muon_weight_decay: float | None = None  #: name muon: Muon's decoupled weight decay (null: weight_decay)
    #: name muon: Muon's lr scaling by shape: original √max(1, rows/cols), match_rms_adamw 0.2·√max(rows, cols)
    muon_adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original"
    #: name muon: fnmatch patterns of the parameter names Muon takes (null: every 2-D weight but embeddings and head)
    muon_params: list[str] | None = None

    def __post_init__(self) -> None:
        import math

        for name in ("lr", "eps", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number, got {value}")
        if not all(math.isfinite(b) for b in self.betas):
            raise ValueError(f"betas: must be finite, got {self.betas}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas: must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.eps <= 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"name: must be 'adamw' or 'muon', got {self.name!r}")
        if not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise ValueError(f"muon_lr: must be a finite number > 0, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.muon_weight_decay is not None and not (math.isfinite(self.muon_weight_decay)
                                                       and self.muon_weight_decay >= 0):
            raise ValueError(f"muon_weight_decay: must be a finite number >= 0 or null, got {self.muon_weight_decay}")
        if self.muon_adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"muon_adjust_lr_fn: must be 'original' or 'match_rms_adamw', got {self.muon_adjust_lr_fn!r}")
        if self.muon_params is not None and (not isinstance(self.muon_params, list) or not self.muon_params):
            raise ValueError(f"muon_params: must be a non-empty list of name patterns or null, got {self.muon_params!r}")


def _default_deepspeed_config() -> str:
    from optsel.resources import default_deepspeed_config

    return default_deepspeed_config()


@dataclass(kw_only=True)
class EngineConfig:
    """Which backend and how it shards.

    deepspeed_config: path to a DeepSpeed JSON (default: the bundled ``deepspeed/zero3.json``, see
    ``optsel configs list``); optsel fills the batch sizes, optimizer and scheduler from the run config.
    precision "auto" = bf16 on CUDA, fp32 on CPU.
    """

    name: Literal["deepspeed", "fsdp2"] = "deepspeed"  #: the distributed backend
    #: engine deepspeed: a DeepSpeed JSON (batch sizes, optimizer, scheduler filled by optsel)
    deepspeed_config: str = field(default_factory=_default_deepspeed_config)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  #: auto: bf16 on CUDA, fp32 on CPU
    collective_timeout_s: float = 600.0  #: seconds a collective may wait for the other ranks before the run fails
    #: engine deepspeed: top-level keys merged into the DeepSpeed JSON
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import math

        if not (math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0):
            raise ValueError(f"collective_timeout_s: must be a finite number > 0, got {self.collective_timeout_s}")


class Engine(abc.ABC):
    """A training backend.

    ``module`` is the model to call (a DeepSpeed engine, an FSDP2-sharded module or a plain module);
    ``optimizer`` is the torch optimizer that holds the AdamW state (for DeepSpeed: the engine's
    optimizer); both are what ``FilterThenWeight(model, optimizer, ...)`` takes.
    """

    name: str = "engine"
    module: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device

    @abc.abstractmethod
    def forward_backward(self, batch: Batch, sample_weights: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """Backward of ``loss_scale * Σ_i sample_weights[i] * ℓ_i`` over the batch's samples
        (ℓ_i: sample i's token-mean CE). Returns the per-sample losses [n] (detached, float32)."""

    def backward_from_pass(self, pool_pass: Any, rows: torch.Tensor, sample_weights: torch.Tensor,
                           loss_scale: float) -> torch.Tensor:
        """The single pass (selection/single_pass.py): accumulate the gradient of
        ``loss_scale * Σ_i sample_weights[i] * ℓ_i`` over the pool rows ``rows`` [s] from what the
        selector's capture kept, with no second forward. Returns those rows' losses [s] (float32,
        cpu). Engines that cannot do it leave ``supports_single_pass`` False (the trainer then runs
        :meth:`forward_backward` on the chosen rows)."""
        raise NotImplementedError(f"engine {self.name}: no single-pass backward")

    #: whether :meth:`backward_from_pass` is implemented
    supports_single_pass: bool = False

    @abc.abstractmethod
    def step(self) -> float:
        """Clip, optimizer step, LR-schedule step, zero grads. Returns the pre-clip global grad norm."""

    @abc.abstractmethod
    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """Per-sample token-mean losses [n] without gradients (every rank must call it)."""

    @abc.abstractmethod
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation [n, max_new_tokens] (every rank must call it; ZeRO-3/FSDP gather params)."""

    @abc.abstractmethod
    def lr(self) -> float:
        """Current learning rate."""

    @abc.abstractmethod
    def local_grads_finite(self) -> bool:
        """Whether this rank's (shard of the) accumulated gradient is free of NaN/Inf (no collective;
        the trainer combines the ranks' answers in its per-step all-reduce)."""

    @property
    def unwrapped_model(self) -> nn.Module:
        """The Hugging Face / peft model inside ``module`` (for hooks, e.g. FTW's factor capture):
        DeepSpeed: ``engine.module`` (ZeRO-3 partitioned params); FSDP2: the sharded module itself."""
        return self.module

    def skip_step(self) -> None:
        """Drop the accumulated gradients without stepping (NaN/Inf loss or gradient)."""
        self.optimizer.zero_grad(set_to_none=True)

    @abc.abstractmethod
    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        """Collective: write model, optimizer and LR-schedule state (sharded as it lives) into the
        new folder ``path``, with ``client_state`` (small, JSON-like) beside it."""

    @abc.abstractmethod
    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Collective: restore what :meth:`save_checkpoint` wrote; returns its ``client_state``."""

    def close(self) -> None:
        pass


EngineFactory = Callable[..., Engine]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    def wrap(factory: EngineFactory) -> EngineFactory:
        _ENGINES[name] = factory
        return factory

    return wrap


def build_engine(config: EngineConfig, model: nn.Module, optim: OptimizerConfig, total_steps: int,
                 micro_batch_size: int) -> Engine:
    """Build the engine named by ``config.name`` around ``model`` (not yet sharded)."""
    import importlib

    importlib.import_module(f"optsel.pipeline.engines.{config.name}_engine")
    return _ENGINES[config.name](config=config, model=model, optim=optim, total_steps=total_steps,
                                 micro_batch_size=micro_batch_size)
