"""GREATS (Wang et al., NeurIPS 2024, "GREATS: Online Selection of High-Quality Data for LLM
Training in Every Iteration"): greedy selection on a second-order Taylor estimate of the drop of
the target (validation) loss after one SGD step on the chosen set.

With plain gradients g_i (covered linear weights) and the mean target gradient g_V, the marginal
gain of adding candidate i to the chosen set S is

    gain_i(S) = η ⟨g_i, g_V⟩ − η² Σ_{j∈S} ⟨g_i, g_j⟩,

η = the optimizer's current learning rate (``lr`` overrides). The k candidates are added one by
one by largest gain (ties: lower index); the result is a 0/1 subset with weight 1/k each.

What is taken from the paper: the first-order term, the pairwise second-order interaction term,
the greedy algorithm, the SGD step size η scaling both terms (so a small η makes GREATS close to
top-k by alignment), and the "ghost" inner products ⟨g_i, g_j⟩ = ⟨A_iA_jᵀ, Δ_iΔ_jᵀ⟩ that avoid
materializing per-sample gradients (gram.ghost_gram with P = I, which is exact; ``exact``
materializes G_i instead). Deviations: the validation Hessian in the second-order term is taken as
the identity (the pairwise term is the plain gradient inner product) and the candidate's own
η²/2·||g_i||² self term is left out, as in the paper's practical algorithm; plain-gradient geometry
(no Adam preconditioner) whatever the optimizer; the gain uses only the covered linear weights;
g_V is the mean over the configured target batch.

Under data parallelism the candidate and target factors are all-gathered, every rank computes the
same b and K, and rank 0's greedy choice is broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from optsel.config_loader import check_literal_fields
from optsel.selection import gram as gram_ops
from optsel.selection.alignment import alignment_partial
from optsel.selection.base import Batch, Selection, register_selector
from optsel.selection.baselines.common import (
    CoveredLayerSelector,
    agree,
    check_budget,
    check_chunk_size,
    compute_dtype,
    gather_factors,
    timed,
    uniform_selection,
)
from optsel.selection.capture import Factors, capture_factors
from optsel.selection.model_view import cleans_up
from optsel.selection.preconditioner import LayerBlock
from optsel.selection.target import target_block


@dataclass(kw_only=True)
class GreatsConfig:
    """budget: k. lr: η (None: the optimizer's current lr of its first param group).
    Both gram backends are exact for plain gradients; each field's meaning is its ``#:`` comment."""

    budget: int
    lr: float | None = None  #: η (null: the optimizer's current lr of its first param group)
    #: exact | ghost | auto (per layer, the fewer flops over all N² pairs)
    gram: Literal["exact", "ghost", "auto"] = "auto"
    capture_chunk_size: int | None = None  #: samples per forward/backward (null: the whole pool)
    max_temp_elems: int = 1 << 24  #: bound on the Gram kernels' temporaries

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: must be > 0 or null, got {self.lr}")
        check_literal_fields(self)  # gram: the values of its Literal
        check_chunk_size("capture_chunk_size", self.capture_chunk_size)


def plain_alignment_and_gram(
    pool: Factors, target: Factors, gram: str = "auto", max_temp_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b [N] = ⟨g_i, g_V⟩, K [N, N] = ⟨g_i, g_j⟩) over the covered layers, float64."""
    n = pool.num_samples
    b = torch.zeros(n, dtype=torch.float64)
    K = torch.zeros(n, n, dtype=torch.float64)
    for l, (A, D) in enumerate(zip(pool.A, pool.D)):
        T, d_in, d_out = A.shape[1], A.shape[2], D.shape[2]
        full_r, full_c = slice(0, d_out), slice(0, d_in)
        gv = target_block(target.A[l], target.D[l], full_r, full_c, target.num_samples)
        b += alignment_partial(A, D, gv, full_r, full_c).double().cpu()
        # flop balance over all N² pairs: materialize (N·T + N²)·d_in·d_out vs ghost N²·T²·(d_in + d_out)
        use_exact = gram == "exact" or (gram == "auto" and d_in * d_out * (T + n) <= n * T * T * (d_in + d_out))
        if use_exact:
            blk = LayerBlock(full_r, full_c, torch.ones(d_out, d_in, dtype=A.dtype, device=A.device), None)
            K += gram_ops.exact_gram_partial(A, D, blk, max_temp_elems).double().cpu()
        else:
            ones_o = torch.ones(d_out, dtype=A.dtype, device=A.device)
            ones_i = torch.ones(d_in, dtype=A.dtype, device=A.device)
            K += gram_ops.ghost_gram(A, D, ones_o, ones_i, max_temp_elems).double().cpu()
    return b, 0.5 * (K + K.T)


def greedy_gain(b: torch.Tensor, K: torch.Tensor, k: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GREATS greedy: (chosen [k] in order of addition, gain of each when added [k])."""
    n = b.shape[0]
    chosen: list[int] = []
    gains: list[float] = []
    interaction = torch.zeros(n, dtype=torch.float64)  # Σ_{j∈S} K[:, j]
    taken = torch.zeros(n, dtype=torch.bool)
    for _ in range(min(k, n)):
        gain = lr * b - lr * lr * interaction
        gain = torch.where(taken | ~torch.isfinite(gain), torch.full_like(gain, -torch.inf), gain)
        j = int(torch.argmax(gain))
        chosen.append(j)
        gains.append(float(gain[j]))
        taken[j] = True
        interaction += K[:, j]
    return torch.tensor(chosen, dtype=torch.int64), torch.tensor(gains, dtype=torch.float64)


class Greats(CoveredLayerSelector[GreatsConfig]):
    """GREATS (module docstring); ``Stateful`` (nothing to restore beyond the step counter)."""

    name = "greats"
    needs_target = True

    def learning_rate(self) -> float:
        if self.config.lr is not None:
            return float(self.config.lr)
        groups = getattr(self.optimizer, "param_groups", None)
        if not groups or "lr" not in groups[0]:
            raise ValueError("lr: the optimizer has no param_groups[0]['lr']; set selection.options.greats.lr")
        return float(groups[0]["lr"])

    @cleans_up
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        if target is None:
            raise ValueError("target: GREATS needs a target batch (input_ids, attention_mask, labels)")
        cfg = self.config
        timings: dict[str, float] = {}
        sizes, local = self.capture_pool(pool, timings)
        with timed(timings, "capture"):
            local_t = capture_factors(self.model, target, self.coverage.layers, cfg.capture_chunk_size)
        dtype = compute_dtype(local)
        with timed(timings, "gather"):
            pool_f, target_f = gather_factors(local, dtype, self.comm), gather_factors(local_t, dtype, self.comm)
        with timed(timings, "gram"):
            b, K = plain_alignment_and_gram(pool_f, target_f, cfg.gram, cfg.max_temp_elems)
        with timed(timings, "solve"):
            lr = self.learning_rate()
            chosen, gains = greedy_gain(b, K, cfg.budget, lr)
            chosen, _ = agree(chosen, min(cfg.budget, sum(sizes)), self.comm)
        self.step += 1
        diagnostics = {
            "lr": lr,
            "comm_bytes": self.comm.bytes,
            "gain_first": float(gains[0]) if gains.numel() else 0.0,
            "gain_last": float(gains[-1]) if gains.numel() else 0.0,
            "excluded": dict(self.coverage.excluded),
        }
        sel = uniform_selection(chosen, sizes, timings, diagnostics, utility=lr * b)
        sel.alignment, sel.covered = b, list(self.coverage.names)
        return sel

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state) -> None:
        self.step = int(state.get("step", 0))


@register_selector("greats")
def build_greats(
    *, model: nn.Module, optimizer: Any, budget: int, config: GreatsConfig | None = None, **_: Any
) -> Greats:
    config = config if config is not None else GreatsConfig(budget=budget)
    if config.budget != budget:
        raise ValueError(f"budget: GreatsConfig.budget={config.budget} disagrees with the selection budget {budget}")
    return Greats(model, optimizer, config)


build_greats.config_class = GreatsConfig  # type: ignore[attr-defined]
