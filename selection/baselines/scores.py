"""Score-and-take-top-k baselines without a target: ``loss`` and ``gradnorm``.

- ``loss`` (MaxLoss / selective backprop, e.g. Jiang et al. 2019; Loshchilov & Hutter 2015 rank
  by loss): score_i = ℓ_i, sample i's token-mean CE from one no-grad forward; top k, weight 1/k.
- ``gradnorm`` (MaxGrad, e.g. Katharopoulos & Fleuret 2018 use a norm upper bound; here the exact
  norm): score_i = ||g_i||² over the covered linear weights (find_covered_layers: embeddings, norms
  and a tied lm_head are not covered) in the factored form ||G_i||² = Σ_l ⟨A_iA_iᵀ, Δ_iΔ_iᵀ⟩_F
  (gram.ghost_diag with P = I, which is exact), or by materializing G_i when d_in·d_out ≤ 2T²
  (gram.exact_diag_partial with P = 1) — the cheaper of two exact forms. Top k, weight 1/k.

Both score this rank's candidates locally (a sample's loss and gradient need only its own forward/
backward; ZeRO-3 / FSDP2 hooks see full weights), all-gather the [n] scores, and take the same
top k on every rank (rank 0's choice broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optsel import distributed
from optsel.losses import per_sample_token_mean_ce
from optsel.selection import gram as gram_ops
from optsel.selection.base import Batch, Selection, Selector, register_selector
from optsel.selection.baselines.common import (
    agree,
    check_budget,
    check_chunk_size,
    compute_dtype,
    timed,
    topk,
    uniform_selection,
)
from optsel.selection.capture import Factors, capture_factors, find_covered_layers
from optsel.selection.model_view import cleans_up, model_view_for
from optsel.selection.preconditioner import LayerBlock


@dataclass(kw_only=True)
class ScoreConfig:
    """budget: k. chunk_size: samples per forward (/backward for gradnorm); None: the whole pool.
    max_temp_elems: bound on the Gram kernels' temporaries (gradnorm)."""

    budget: int
    chunk_size: int | None = None  #: samples per forward (/backward for gradnorm; null: the whole pool)
    max_temp_elems: int = 1 << 24  #: bound on the Gram kernels' temporaries (gradnorm)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        check_chunk_size("chunk_size", self.chunk_size)
        if self.max_temp_elems < 1:
            raise ValueError(f"max_temp_elems: must be >= 1, got {self.max_temp_elems}")


@torch.no_grad()
def pool_losses(model: nn.Module, pool: Batch, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sample token-mean CE [n] (float64), forward only."""
    n = int(pool["input_ids"].shape[0])
    step = n if not chunk_size else chunk_size
    out = []
    device = next(model.parameters()).device  # pools arrive on the CPU from the dataloader
    for s in range(0, n, step):
        ids, mask = pool["input_ids"][s : s + step].to(device), pool["attention_mask"][s : s + step].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(per_sample_token_mean_ce(logits, pool["labels"][s : s + step].to(device)).loss.double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def grad_sq_norms(factors: Factors, dtype: torch.dtype, max_temp_elems: int = 1 << 24) -> torch.Tensor:
    """||g_i||² [n] over the covered layers, from factors A [n, T, d_in], D [n, T, d_out] per layer."""
    n = factors.num_samples
    total = torch.zeros(n, dtype=torch.float64, device=factors.A[0].device if factors.A else "cpu")
    for A, D in zip(factors.A, factors.D):
        A, D = A.to(dtype), D.to(dtype)
        T, d_in, d_out = A.shape[1], A.shape[2], D.shape[2]
        if d_in * d_out <= 2 * T * T:
            blk = LayerBlock(
                slice(0, d_out), slice(0, d_in), torch.ones(d_out, d_in, dtype=dtype, device=A.device), None
            )
            total += gram_ops.exact_diag_partial(A, D, blk, max_temp_elems).double()
        else:
            ones_o = torch.ones(d_out, dtype=dtype, device=A.device)
            ones_i = torch.ones(d_in, dtype=dtype, device=A.device)
            total += gram_ops.ghost_diag(A, D, ones_o, ones_i, max_temp_elems).double()
    return total


class _TopScoreSelector(Selector):
    """Top k of a per-candidate score computed locally and all-gathered."""

    def __init__(self, model: nn.Module, config: ScoreConfig, optimizer: Any = None):
        self.model = model
        self.config = config
        self.view = model_view_for(model, optimizer)
        self.comm = distributed.CommCounter()

    def local_scores(self, pool: Batch, timings: dict[str, float]) -> torch.Tensor:
        raise NotImplementedError

    @cleans_up
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        self.comm.reset()
        timings: dict[str, float] = {}
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        local = self.local_scores(pool, timings)
        with timed(timings, "select"):
            scores = distributed.all_gather_cat(local.cpu(), self.comm)
            chosen, _ = agree(topk(scores, self.config.budget), min(self.config.budget, sum(sizes)), self.comm)
        return uniform_selection(chosen, sizes, timings, {"comm_bytes": self.comm.bytes}, utility=scores)


class LossSelector(_TopScoreSelector):
    """The k highest-loss candidates, weight 1/k (see module docstring)."""

    name = "loss"

    def local_scores(self, pool: Batch, timings: dict[str, float]) -> torch.Tensor:
        with timed(timings, "forward"):
            return pool_losses(self.model, pool, self.config.chunk_size)


class GradNormSelector(_TopScoreSelector):
    """The k candidates with the largest per-sample gradient norm, weight 1/k (module docstring)."""

    name = "gradnorm"

    def __init__(self, model: nn.Module, config: ScoreConfig, optimizer: Any = None):
        super().__init__(model, config, optimizer)
        self.coverage = find_covered_layers(model, self.view)

    def local_scores(self, pool: Batch, timings: dict[str, float]) -> torch.Tensor:
        with timed(timings, "capture"):
            factors = capture_factors(self.model, pool, self.coverage.layers, self.config.chunk_size)
        with timed(timings, "gram"):
            return grad_sq_norms(factors, compute_dtype(factors), self.config.max_temp_elems)


def _check(config: ScoreConfig | None, budget: int) -> ScoreConfig:
    config = config if config is not None else ScoreConfig(budget=budget)
    if config.budget != budget:
        raise ValueError(f"budget: config.budget={config.budget} disagrees with the selection budget {budget}")
    return config


@register_selector("loss")
def build_loss(
    *, model: nn.Module, budget: int, config: ScoreConfig | None = None, optimizer: Any = None, **_: Any
) -> LossSelector:
    return LossSelector(model, _check(config, budget), optimizer)


@register_selector("gradnorm")
def build_gradnorm(
    *, model: nn.Module, budget: int, config: ScoreConfig | None = None, optimizer: Any = None, **_: Any
) -> GradNormSelector:
    return GradNormSelector(model, _check(config, budget), optimizer)


build_loss.config_class = ScoreConfig  # type: ignore[attr-defined]
build_gradnorm.config_class = ScoreConfig  # type: ignore[attr-defined]
