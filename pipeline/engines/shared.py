"""What every engine shares: the engine and optimizer configs, the Engine seam and its registry, the
causal-LM base both engines subclass, and the pieces of the step they must compute identically.

An engine owns the (sharded) model, its optimizer and LR schedule. The trainer only calls the verbs
of :class:`Engine`; everything engine-specific (ZeRO-3 partitioning, FSDP2 ``fully_shard``, mixed
precision, gradient clipping, checkpoint formats) stays inside the implementation. Nothing here knows
about DeepSpeed or FSDP2: both backends train on exactly the same objective (the weighted per-sample
loss), with exactly the same LR schedule, precision rule and greedy decoding. An engine subclasses
:class:`CausalLMEngine` and adds how it backpropagates (``_backward``) and what a forward without
backward leaves to tidy (``_after_forward``), besides its own step, checkpoint and gradient checks.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from optsel import distributed
from optsel.losses import SampleLosses, per_sample_token_mean_ce
from optsel.registry import Registry
from optsel.resources import default_deepspeed_config
from optsel.selection.base import Batch

log = logging.getLogger("optsel.engine")


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
        if self.muon_weight_decay is not None and not (
            math.isfinite(self.muon_weight_decay) and self.muon_weight_decay >= 0
        ):
            raise ValueError(f"muon_weight_decay: must be a finite number >= 0 or null, got {self.muon_weight_decay}")
        if self.muon_adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(
                f"muon_adjust_lr_fn: must be 'original' or 'match_rms_adamw', got {self.muon_adjust_lr_fn!r}"
            )
        if self.muon_params is not None and (not isinstance(self.muon_params, list) or not self.muon_params):
            raise ValueError(
                f"muon_params: must be a non-empty list of name patterns or null, got {self.muon_params!r}"
            )


def _default_deepspeed_config() -> str:
    return default_deepspeed_config()


@dataclass(kw_only=True)
class EngineConfig:
    """Which backend and how it shards.

    deepspeed_config: path to a DeepSpeed JSON (default: the bundled ``deepspeed/zero3.json``, see
    ``optsel configs list``); optsel fills the batch sizes, optimizer and scheduler from the run config.
    precision "auto" = bf16 on CUDA, fp32 on CPU.
    """

    #: the distributed backend: deepspeed | fsdp2 | a plug-in's (an ``optsel.engines`` entry point), checked
    #: against the engine registry when the run config loads
    name: str = "deepspeed"
    #: engine deepspeed: a DeepSpeed JSON (batch sizes, optimizer, scheduler filled by optsel)
    deepspeed_config: str = field(default_factory=_default_deepspeed_config)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  #: auto: bf16 on CUDA, fp32 on CPU
    collective_timeout_s: float = 600.0  #: seconds a collective may wait for the other ranks before the run fails
    #: engine deepspeed: top-level keys merged into the DeepSpeed JSON
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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

    def backward_from_pass(
        self, pool_pass: Any, rows: torch.Tensor, sample_weights: torch.Tensor, loss_scale: float
    ) -> torch.Tensor:
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

    def close(self) -> None:  # noqa: B027  (optional hook: an engine without resources to free keeps it)
        pass


EngineFactory = Callable[..., Engine]
#: engines by name: optsel's own (the modules below) and the ``optsel.engines`` entry points
ENGINES: Registry[EngineFactory] = Registry(
    "engine",
    builtin_modules=("optsel.pipeline.engines.deepspeed_engine", "optsel.pipeline.engines.fsdp2_engine"),
    group="optsel.engines",
)


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Class decorator: make an engine buildable by ``engine.name`` (a taken name is refused)."""
    return ENGINES.register(name)


def build_engine(
    config: EngineConfig, model: nn.Module, optim: OptimizerConfig, total_steps: int, micro_batch_size: int
) -> Engine:
    """Build the engine named by ``config.name`` around ``model`` (not yet sharded)."""
    return ENGINES.get(config.name)(
        config=config, model=model, optim=optim, total_steps=total_steps, micro_batch_size=micro_batch_size
    )


MODEL_INPUT_KEYS = ("input_ids", "attention_mask")
#: set (by ``optsel train --verbose``) to keep every warning, the known third-party ones included
VERBOSE_ENV = "OPTSEL_VERBOSE"


def quiet_known_warning(message: str, category: type[Warning], module: str) -> None:
    """Hide one known third-party warning (``message``: a regex on its start, ``module``: the module it
    is attributed to), process-wide, unless $OPTSEL_VERBOSE is set. Called where optsel calls the API
    that emits it; never a blanket filter."""

    if not os.environ.get(VERBOSE_ENV):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def check_sample_weights(sample_weights: torch.Tensor, n: int) -> torch.Tensor:
    """Validate per-sample weights [n] (finite, >= 0) and return them as float32."""
    if sample_weights.dim() != 1 or sample_weights.numel() != n:
        raise ValueError(
            f"sample_weights: expected shape [{n}] (one weight per sample), got {tuple(sample_weights.shape)}"
        )
    w = sample_weights.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"sample_weights: must be finite and >= 0, got {w.tolist()}")
    return w


def weighted_objective(losses: torch.Tensor, sample_weights: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """``loss_scale * Σ_i w_i ℓ_i`` (scalar). losses [n] (with grad), sample_weights [n]."""
    return loss_scale * (sample_weights.to(losses.device, losses.dtype) * losses).sum()


class EmptySampleCounter:
    """Counts weighted samples that carry no label (their weight is silently wasted otherwise)."""

    def __init__(self) -> None:
        self.count = 0

    def check(self, losses: SampleLosses, sample_weights: torch.Tensor) -> None:
        wasted = losses.empty.cpu() & (sample_weights.cpu() > 0)
        if bool(wasted.any()):
            first = self.count == 0
            self.count += int(wasted.sum())
            (log.warning if first else log.debug)(
                "%d sample(s) with weight > 0 have no valid label (loss 0, no gradient); %d so far "
                "(further occurrences are logged at debug level; see engine.empty_samples.count)",
                int(wasted.sum()),
                self.count,
            )


# -- learning-rate schedule -------------------------------------------------------------------------


def lr_factor(step: int, optim: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based, = completed steps).

    Linear warmup (step+1)/warmup_steps over the first ``warmup_steps`` steps, then ``constant``
    (1), ``linear`` or ``cosine`` decay from 1 to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, max(0.0, (step - optim.warmup_steps) / decay_steps))
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if optim.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: unknown schedule {optim.schedule!r}")


def lr_scheduler_factory(
    optim: OptimizerConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """``optimizer -> LambdaLR`` following :func:`lr_factor` (DeepSpeed accepts this callable)."""
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: must be in [0, 1], got {optim.min_lr_ratio}")

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))

    return build


# -- precision and device ---------------------------------------------------------------------------


def resolve_precision(precision: Literal["auto", "fp32", "bf16"], device: torch.device) -> torch.dtype:
    """Compute dtype: "auto" = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    raise ValueError(f"precision: expected auto, fp32 or bf16, got {precision!r}")


def local_device() -> torch.device:
    """cuda:<local rank> when CUDA is present, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.info().local_rank)
    return torch.device("cpu")


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The keys the model takes (input_ids, attention_mask), on ``device``."""
    missing = [k for k in (*MODEL_INPUT_KEYS, "labels") if k not in batch]
    if missing:
        raise KeyError(f"batch is missing key(s) {missing}; got {sorted(batch)}")
    return {k: batch[k].to(device) for k in MODEL_INPUT_KEYS}


def hf_config_of(model: nn.Module):
    """The Hugging Face config of a (peft-wrapped / sharded) causal LM, or None."""
    for m in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "hidden_size"):
            return cfg
    return None


# -- greedy decoding ----------------------------------------------------------------------------------


def left_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (mask 1) to the right end, so [:, -1] is every row's last token.
    Works for left- or right-padded input [n, T]; rows must hold at least one token."""
    lengths = attention_mask.sum(dim=1)
    empty = (lengths == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"attention_mask: rows {empty.tolist()} have no tokens; cannot continue an empty prompt")
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for i in range(input_ids.shape[0]):
        real = input_ids[i][attention_mask[i].bool()]
        ids[i, width - real.numel() :] = real
        mask[i, width - real.numel() :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, device: torch.device
) -> torch.Tensor:
    """Greedy continuation [n, max_new_tokens] (int64, cpu) by calling ``module`` forward once per
    token with a KV cache. Every rank must call it the same number of times (ZeRO-3 / FSDP2 gather
    parameters inside forward), which holds because the loop length is ``max_new_tokens``."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    ids, mask = left_align(input_ids.cpu(), attention_mask.cpu())
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out: list[torch.Tensor] = []
    past, cache_key = None, "past_key_values"
    step_ids = ids
    for _ in range(max_new_tokens):
        result = module(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **({} if past is None else {cache_key: past}),
        )
        # transformers 5.24 renamed the KV cache `cache` (argument and output field; `past_key_values` warns on
        # every call): pass it back under the name the model's output uses (older models: past_key_values)
        cache_key = "cache" if "cache" in getattr(type(result), "__dataclass_fields__", {}) else "past_key_values"
        past = getattr(result, cache_key)
        nxt = result.logits[:, -1].argmax(-1)
        out.append(nxt)
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
    if not out:
        return torch.zeros((input_ids.shape[0], 0), dtype=torch.long)
    return torch.stack(out, dim=1).cpu()


def pass_losses(pool_pass, rows: torch.Tensor, weights: torch.Tensor, counter: EmptySampleCounter) -> torch.Tensor:
    """The chosen rows' losses [s] (float32, cpu) from a single pass; counts weighted empty samples."""
    rows = pool_pass.pass_rows(rows, weights)
    losses = SampleLosses(
        pool_pass.loss[rows.to(pool_pass.loss.device)].detach(), pool_pass.tokens[rows.to(pool_pass.tokens.device)]
    )
    counter.check(losses, weights)
    return losses.loss.float().cpu()


class CausalLMEngine(Engine):
    """Shared verbs; subclasses set ``module``, ``optimizer``, ``scheduler``, ``device`` and
    ``empty_samples`` (a :class:`EmptySampleCounter`)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    empty_samples: EmptySampleCounter

    def _backward(self, objective: torch.Tensor) -> None:
        """Backpropagate the scalar ``objective`` (DeepSpeed: through its engine)."""
        objective.backward()

    def _after_forward(self) -> None:
        """After a forward without backward (FSDP2: reshard the root)."""

    def _losses(self, batch: Batch) -> SampleLosses:
        inputs = model_inputs(batch, self.device)
        logits = self.module(**inputs, use_cache=False).logits
        return per_sample_token_mean_ce(logits, batch["labels"].to(self.device))

    def forward_backward(self, batch: Batch, sample_weights: torch.Tensor, loss_scale: float) -> torch.Tensor:
        weights = check_sample_weights(sample_weights, batch["input_ids"].shape[0])
        self.module.train()
        losses = self._losses(batch)
        self.empty_samples.check(losses, weights)
        self._backward(weighted_objective(losses.loss, weights, loss_scale))
        return losses.loss.detach().float().cpu()

    @torch.no_grad()
    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        try:
            return self._losses(batch).loss.float().cpu()
        finally:
            self._after_forward()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            return greedy_generate(self.module, input_ids, attention_mask, max_new_tokens, self.device)
        finally:
            self.module.train(was_training)
            self._after_forward()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
