"""Stage 1 of two-stage FTW, ``prefilter: learned`` (docs/design.md, "Two stages"): a score that runs no model.

Each candidate i is described by model-free features φ_i [D], D = 2B + 3 (+ 3 with ``prefilter_overlap``): its
token unigram and bigram counts hashed into B buckets (``prefilter_features``) for the prompt (attended, unlabelled
positions) and for the response (labelled positions) apart, each part scaled to unit L2 norm, then a constant 1 and
log(1 + tokens) of each part; with ``prefilter_overlap`` the share of the response's tokens, of its bigrams and of
its reversed bigrams that occur in the prompt (a comparison of the response with its prompt). The score is a ridge
regression of stage 2's exact FTW utility u on φ, refitted every step from decayed sufficient statistics over every
earlier survivor,

    A ← γ A + Φ_sᵀ Φ_s,   c ← γ c + Φ_sᵀ u_s,   β = (A + λ I)⁻¹ c,   û_i = φ_iᵀ β

(Φ_s [m, D], u_s [m]: the last step's survivors and their exact u; γ = ``prefilter_decay``, λ =
``prefilter_ridge``). The first ``prefilter_learn_steps`` steps send the whole pool to stage 2 (exact one-stage
steps that label N candidates each; stage 2 keeps every survivor with u > 0, so their QP has no filter cap). Then
the m survivors are the top m − e by û plus e = round(explore·m) drawn uniformly from the rest by the selector's
generator (``prefilter_explore``), so the regression keeps seeing candidates it would not pick. ``prefilter_stage2:
score`` skips stage 2 on most steps: the k best by û, with uniform weights, train with the trainer's own step; every
``prefilter_label_every``-th step after the learning steps is again an exact one-stage step that labels the pool.

What it approximates: FTW's utility as far as a linear function of which tokens occur can express it
(topic, format, length). Without the overlap shares it cannot tell whether a response is right for its prompt (a
bag of tokens does not compare them); with them it sees how much of the response its prompt contains, which tells
a copied, extracted or mismatched answer, not a wrong computation. It follows the model's state only through the
refit, one step late. Cost: O(T) integer work per candidate and one D × D solve per step; no FLOPs of the model,
no collective beyond one all-gather of the N × D features. Every rank holds the same statistics (fitted on gathered
features and stage 2's utilities, which are identical on every rank), so R ranks pick what one process picks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optsel import distributed
from optsel.selection.base import Batch, Selection
from optsel.selection.ftw.prefilter import IGNORE
from optsel.selection.ftw.two_stage import Stage1, SurvivorPool
from optsel.selection.ftw_config import FTWConfig
from optsel.selection.timing import phase

_MODULUS = 2_147_483_647  # a prime below 2^31: hashes stay exact in int64
_UNIGRAM = (1_000_003, 7)
_BIGRAM = (999_983, 11)
_BIGRAM_BASE = 1_048_583  # a prime above 2^20: (a, b) → a·base + b is one-to-one for token ids below it


def feature_dim(buckets: int, overlap: bool = False) -> int:
    """D: 2 parts × ``buckets`` hashed counts, a constant and log(1 + tokens) of each part (+ 3 overlap shares)."""
    return 2 * buckets + 3 + (3 if overlap else 0)


def _bucket(keys: torch.Tensor, salt: tuple[int, int], buckets: int) -> torch.Tensor:
    mult, add = salt
    return ((keys % _MODULUS) * mult + add) % _MODULUS % buckets


def hashed_features(batch: Mapping[str, torch.Tensor], buckets: int, overlap: bool = False) -> torch.Tensor:
    """φ [n, D] float64 on the batch's device (module docstring). Token t is in the response when
    ``labels[t] != -100`` (the labels are aligned with the inputs, as Hugging Face's causal LMs take them),
    in the prompt when attended and unlabelled; the bigram (t − 1, t) counts for t's part when t − 1 is
    attended. Token ids must be in [0, 1_048_583). ``overlap``: the 3 columns of :func:`overlap_features` last."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= _BIGRAM_BASE):
        raise ValueError(f"prefilter: 'learned' hashes token ids in [0, {_BIGRAM_BASE}), got {int(ids.max())}")
    n, T = ids.shape
    response = mask & (labels != IGNORE)
    prompt = mask & ~response
    uni = _bucket(ids.long(), _UNIGRAM, buckets)
    bi = torch.zeros_like(uni)
    bi[:, 1:] = _bucket(ids[:, :-1].long() * _BIGRAM_BASE + ids[:, 1:].long(), _BIGRAM, buckets)
    has_prev = torch.zeros_like(mask)
    has_prev[:, 1:] = mask[:, :-1]
    parts = []
    for part in (prompt, response):
        counts = torch.zeros(n, buckets, dtype=torch.float64, device=ids.device)
        counts.scatter_add_(1, uni, part.double())
        counts.scatter_add_(1, bi, (part & has_prev).double())
        parts.append(counts / counts.norm(dim=1, keepdim=True).clamp(min=1e-12))
    lengths = torch.stack([prompt.sum(1), response.sum(1)], dim=1).double()
    extra = [overlap_features(ids.long(), prompt, response)] if overlap else []
    return torch.cat([*parts, torch.ones(n, 1, dtype=torch.float64, device=ids.device), lengths.log1p(), *extra], dim=1)


def overlap_features(ids: torch.Tensor, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """[n, 3] float64: the share of the response's tokens whose id occurs in the prompt, of its bigrams (both tokens in
    the response) that occur as prompt bigrams (both in the prompt), and of its bigrams (a, b) whose reverse (b, a) is a
    prompt bigram; 0 for a row without a response token (or bigram). ids [n, T] int64 in [0, 1_048_583); masks [n, T].
    Keys (ids, bigrams a·base + b) are < 2^41; the row index is added above them, so one ``isin`` answers every row."""
    row = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) << 41
    token = ids + row
    bigram = ids[:, :-1] * _BIGRAM_BASE + ids[:, 1:] + row
    reverse = ids[:, 1:] * _BIGRAM_BASE + ids[:, :-1] + row
    prompt_bi, response_bi = prompt[:, :-1] & prompt[:, 1:], response[:, :-1] & response[:, 1:]
    prompt_tokens, prompt_bigrams = token[prompt], bigram[prompt_bi]
    hits = [
        (torch.isin(token, prompt_tokens) & response, response),
        (torch.isin(bigram, prompt_bigrams) & response_bi, response_bi),
        (torch.isin(reverse, prompt_bigrams) & response_bi, response_bi),
    ]
    return torch.stack([h.sum(1).double() / of.sum(1).clamp(min=1).double() for h, of in hits], dim=1)


class OnlineRidge:
    """Ridge regression from decayed sufficient statistics A [D, D], c [D] (float64, CPU)."""

    def __init__(self, dim: int, decay: float, ridge: float):
        self.dim, self.decay, self.ridge = dim, decay, ridge
        self.A = torch.zeros(dim, dim, dtype=torch.float64)
        self.c = torch.zeros(dim, dtype=torch.float64)
        self.observed = 0

    def observe(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """One step's rows X [n, D] and targets y [n] (finite); older statistics decay by γ first."""
        X, y = X.double().cpu(), y.double().cpu()
        self.A = self.decay * self.A + X.T @ X
        self.c = self.decay * self.c + X.T @ y
        self.observed += int(X.shape[0])

    def coefficients(self) -> torch.Tensor:
        """β [D] = (A + λ I)⁻¹ c."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return torch.linalg.solve(self.A + self.ridge * eye, self.c)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """û [n] = X β."""
        return X.double().cpu() @ self.coefficients()

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A.clone(), "c": self.c.clone(), "observed": self.observed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        A, c = torch.as_tensor(state["A"], dtype=torch.float64), torch.as_tensor(state["c"], dtype=torch.float64)
        if A.shape != (self.dim, self.dim) or c.shape != (self.dim,):
            raise ValueError(
                f"prefilter learned state: statistics of shape {tuple(A.shape)}, {tuple(c.shape)} do not fit "
                f"D = {self.dim} (was prefilter_features or prefilter_overlap changed since the checkpoint?)"
            )
        self.A, self.c, self.observed = A.clone(), c.clone(), int(state["observed"])


class LearnedPrefilter:
    """Stage 1 ``prefilter: learned`` (module docstring). ``generator``: the selector's (the same draws on
    every rank)."""

    def __init__(self, config: FTWConfig, generator: torch.Generator):
        self.config, self.generator = config, generator
        dim = feature_dim(config.prefilter_features, config.prefilter_overlap)
        self.ridge = OnlineRidge(dim, config.prefilter_decay, config.prefilter_ridge)
        self.steps = 0  # selection steps seen (labelling or not)
        self._features: torch.Tensor | None = None
        self._labelling = False

    def labels_whole_pool(self) -> bool:
        """Whether this step sends every candidate to stage 2: the learning steps, and under ``prefilter_stage2:
        score`` every ``prefilter_label_every``-th step after them."""
        cfg, learn = self.config, self.config.prefilter_learn_steps
        if self.steps < learn:
            return True
        every = cfg.prefilter_label_every
        return cfg.prefilter_stage2 == "score" and every is not None and (self.steps - learn + 1) % every == 0

    def features(self, pool: Batch, comm: distributed.CommCounter) -> torch.Tensor:
        """φ of the whole pool [N, D] (this rank's rows hashed, all-gathered), on the CPU."""
        local = hashed_features(pool, self.config.prefilter_features, self.config.prefilter_overlap)
        return (distributed.all_gather_cat(local, comm) if distributed.is_distributed() else local).cpu()

    def score_only(
        self, pool: Batch, comm: distributed.CommCounter, timings: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``prefilter_stage2: score`` on a step that does not label: (the k best by û, ascending [k]; û [N])."""
        with phase(timings, comm, "stage1"):
            feats = self.features(pool, comm)
            predicted = self.ridge.predict(feats)
            k = min(self.config.budget, int(feats.shape[0]))
            chosen = torch.sort(predicted, descending=True, stable=True).indices[:k].sort().values.to(torch.int64)
        self.steps += 1
        return chosen, predicted

    def run(self, pool: Batch, sizes: list[int], comm: distributed.CommCounter, timings: dict[str, float]) -> Stage1:
        """Features of the whole pool, the predicted û [N] and the m survivors (every row on a labelling step)."""
        cfg = self.config
        with phase(timings, comm, "stage1"):
            feats = self.features(pool, comm)
            n = int(feats.shape[0])
            self._labelling = self.labels_whole_pool()
            self.steps += 1
            predicted = self.ridge.predict(feats) if self.ridge.observed else torch.zeros(n, dtype=torch.float64)
            if self._labelling:
                survivors = torch.arange(n, dtype=torch.int64)
            else:
                survivors = self._survivors(predicted, cfg.num_filtered(n))
        self._features = feats
        alignment = torch.full((n,), float("nan"), dtype=torch.float64)  # exact b: filled in at the survivors
        # utility [N]: û, or (a labelling step) stage 2's exact u, filled in by observe()
        return Stage1(survivors, alignment, predicted, target_reused=False, kind="learned")

    def _survivors(self, predicted: torch.Tensor, m: int) -> torch.Tensor:
        explore = min(round(self.config.prefilter_explore * m), m)
        order = torch.sort(predicted, descending=True, stable=True).indices
        top, rest = order[: m - explore], order[m - explore :]
        drawn = rest[torch.randperm(int(rest.numel()), generator=self.generator)[:explore]]
        return torch.cat([top, drawn]).sort().values.to(torch.int64)

    def observe(self, stage1: Stage1, sel: Selection, survivors: SurvivorPool) -> None:
        """Fit on this step's survivors: their features and stage 2's exact u (and record their exact b)."""
        if self._features is None or sel.utility is None:
            raise RuntimeError("prefilter learned: observe() needs this step's run() and stage 2's utility")
        rows = survivors.global_of[survivors.eligible]
        u = sel.utility.double()[survivors.eligible]
        if sel.alignment is not None:
            stage1.alignment[rows] = sel.alignment.double()[survivors.eligible]
        if self._labelling:  # a labelling step: u is exact everywhere
            stage1.utility[rows] = u
        finite = torch.isfinite(u)
        self.ridge.observe(self._features[rows[finite]], u[finite])
        self._features = None

    def state_dict(self) -> dict[str, Any]:
        return {"ridge": self.ridge.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "ridge" in state:
            self.ridge.load_state_dict(state["ridge"])
        self.steps = int(state.get("steps", 0))


__all__ = ["LearnedPrefilter", "OnlineRidge", "feature_dim", "hashed_features", "overlap_features"]
