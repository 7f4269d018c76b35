"""Pieces every engine shares: the weighted per-sample objective, the LR schedule, precision and
device choice, moving a batch, greedy decoding by repeated forward calls.

Nothing here knows about DeepSpeed or FSDP2; the engines call these so that both backends train on
exactly the same objective with exactly the same schedule.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Literal

import torch
from torch import nn

from optsel import distributed
from optsel.losses import SampleLosses
from optsel.pipeline.engines.base import Batch, OptimizerConfig

log = logging.getLogger("optsel.engine")

MODEL_INPUT_KEYS = ("input_ids", "attention_mask")
#: set (by ``optsel train --verbose``) to keep every warning, the known third-party ones included
VERBOSE_ENV = "OPTSEL_VERBOSE"


def quiet_known_warning(message: str, category: type[Warning], module: str) -> None:
    """Hide one known third-party warning (``message``: a regex on its start, ``module``: the module it
    is attributed to), process-wide, unless $OPTSEL_VERBOSE is set. Called where optsel calls the API
    that emits it; never a blanket filter."""
    import os
    import warnings

    if not os.environ.get(VERBOSE_ENV):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def check_sample_weights(sample_weights: torch.Tensor, n: int) -> torch.Tensor:
    """Validate per-sample weights [n] (finite, >= 0) and return them as float32."""
    if sample_weights.dim() != 1 or sample_weights.numel() != n:
        raise ValueError(f"sample_weights: expected shape [{n}] (one weight per sample), "
                         f"got {tuple(sample_weights.shape)}")
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
                int(wasted.sum()), self.count)


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


def lr_scheduler_factory(optim: OptimizerConfig, total_steps: int
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

def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0
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
        ids[i, width - real.numel():] = real
        mask[i, width - real.numel():] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, device: torch.device) -> torch.Tensor:
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
        result = module(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **({} if past is None else {cache_key: past}))
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


def pass_losses(pool_pass, rows: torch.Tensor, weights: torch.Tensor, counter: "EmptySampleCounter") -> torch.Tensor:
    """The chosen rows' losses [s] (float32, cpu) from a single pass; counts weighted empty samples."""
    rows = pool_pass.pass_rows(rows, weights)
    losses = SampleLosses(pool_pass.loss[rows.to(pool_pass.loss.device)].detach(),
                          pool_pass.tokens[rows.to(pool_pass.tokens.device)])
    counter.check(losses, weights)
    return losses.loss.float().cpu()
