"""UDS — Utility-Diversity Sampling (Zou et al., "Utility-Diversity Aware Online Batch Selection
for LLM Supervised Fine-tuning", arXiv 2510.16882; reference code github.com/gfyddha/UDS).

From one no-grad forward over the pool, for each candidate i with logits L_i [T, V]:
- intra-sample score s_i = ||L_i||_* (nuclear norm: sum of singular values), utility + diversity
  within the sample;
- an SRFT (subsampled randomized Fourier transform) bilinear embedding E_i = S_t F D_t L_i D_v F S_v
  of size [r_t, r_v] (random ±1 signs D, real part of the FFT F, r coordinates sampled with
  replacement S, scaled by sqrt(dim/r)), with L_i zero-padded to ``max_seq_len`` rows;
- inter-sample score d_i = mean Euclidean distance from E_i to the embeddings in a FIFO memory
  buffer of past *selected* samples (0 while the buffer is empty);
- score = s_i + α d_i; the top k are taken (weight 1/k) and their embeddings pushed into the buffer.

Defaults are the reference code's (UDSamplingTrainer): buffer 1024 embeddings, r_v = 128 vocab
and r_t = 8 time coordinates, α = 2.5e-3 (its trainer default; the published MMLU script uses
1.5e-3). Deviations: logits at padding positions are zeroed (the reference scores the padded
batch as is), and the projection draws come from this selector's seeded CPU generator (identical on
every rank) instead of the global CUDA RNG. The buffer, its pointer and the projection seed are in
``state_dict``, so a resumed run selects exactly as an uninterrupted one.

Under data parallelism each rank scores and embeds its own candidates; scores and embeddings
[n, r_t·r_v] are all-gathered, every rank takes the same top k (rank 0's broadcast) and pushes the
same embeddings, so the buffer stays identical on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optsel import distributed
from optsel.selection.base import Batch, Selection, Selector, register_selector
from optsel.selection.baselines.common import agree, check_budget, check_chunk_size, timed, topk, uniform_selection
from optsel.selection.model_view import cleans_up, model_view_for


@dataclass(kw_only=True)
class UDSConfig:
    """budget: k. alpha: α, the weight of the diversity score. buffer_size: FIFO memory of past
    selections (embeddings). proj_dim_vocab / proj_dim_time: r_v, r_t of the SRFT embedding.
    max_seq_len: rows the logits are padded to before the time-axis SRFT (a longer pool is an
    error). chunk_size: samples per forward (None: the whole pool)."""

    budget: int
    alpha: float = 2.5e-3  #: α, the weight of the diversity score
    buffer_size: int = 1024  #: FIFO memory of past selections (embeddings)
    proj_dim_vocab: int = 128  #: r_v of the SRFT embedding
    proj_dim_time: int = 8  #: r_t of the SRFT embedding
    max_seq_len: int = 512  #: rows the logits are padded to before the time-axis SRFT (a longer pool is an error)
    chunk_size: int | None = None  #: samples per forward (null: the whole pool)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not self.alpha >= 0:
            raise ValueError(f"alpha: must be >= 0, got {self.alpha}")
        for name in ("buffer_size", "proj_dim_vocab", "proj_dim_time", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_chunk_size("chunk_size", self.chunk_size)


class SRFTProjector:
    """Bilinear SRFT embedding X [B, T, V] → [B, r_t, r_v] (as the reference's FastJLProjector)."""

    def __init__(self, seq_len: int, vocab: int, r_time: int, r_vocab: int, seed: int):
        gen = torch.Generator().manual_seed(int(seed))
        self.seq_len, self.vocab = seq_len, vocab
        self.sign_v = torch.randint(0, 2, (vocab,), generator=gen).double() * 2 - 1
        self.idx_v = torch.randint(0, vocab, (r_vocab,), generator=gen)
        self.sign_t = torch.randint(0, 2, (seq_len,), generator=gen).double() * 2 - 1
        self.idx_t = torch.randint(0, seq_len, (r_time,), generator=gen)
        self.scale_v = (vocab / r_vocab) ** 0.5
        self.scale_t = (seq_len / r_time) ** 0.5

    def project(self, X: torch.Tensor) -> torch.Tensor:
        B, T, V = X.shape
        if V != self.vocab:
            raise ValueError(f"uds: logits have vocab {V}, the projector was built for {self.vocab}")
        if T > self.seq_len:
            raise ValueError(
                f"max_seq_len: the pool has sequences of {T} tokens, more than "
                f"selection.options.uds.max_seq_len={self.seq_len}"
            )
        dev, dt = X.device, X.dtype
        X = torch.nn.functional.pad(X, (0, 0, 0, self.seq_len - T))
        X = torch.fft.fft(X * self.sign_v.to(dev, dt), dim=-1).real[..., self.idx_v.to(dev)] * self.scale_v
        X = X * self.sign_t.to(dev, dt).view(1, -1, 1)
        return torch.fft.fft(X, dim=1).real[:, self.idx_t.to(dev), :] * self.scale_t


class UDS(Selector):
    """Utility-Diversity Sampling (module docstring); ``Stateful`` (buffer, pointer, seed)."""

    name = "uds"

    def __init__(self, model: nn.Module, config: UDSConfig, seed: int = 0, optimizer: Any = None):
        self.model = model
        self.config = config
        self.view = model_view_for(model, optimizer)
        self.seed = int(seed)
        self.projector: SRFTProjector | None = None  # built at the first pool (needs V)
        self.buffer = torch.zeros(0, config.proj_dim_time * config.proj_dim_vocab, dtype=torch.float32)
        self.pointer = 0
        self.comm = distributed.CommCounter()

    @torch.no_grad()
    def _score_local(self, pool: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(nuclear norms [n] float64, embeddings [n, r_t·r_v] float32) of this rank's candidates."""
        cfg = self.config
        n = int(pool["input_ids"].shape[0])
        step = n if not cfg.chunk_size else cfg.chunk_size
        nuclear, embed = [], []
        device = next(self.model.parameters()).device  # pools arrive on the CPU from the dataloader
        for s in range(0, n, step):
            mask = pool["attention_mask"][s : s + step].to(device)
            logits = self.model(
                input_ids=pool["input_ids"][s : s + step].to(device), attention_mask=mask
            ).logits.float()
            logits = logits * mask.unsqueeze(-1).to(logits.dtype)
            if self.projector is None:
                self.projector = SRFTProjector(
                    cfg.max_seq_len, logits.shape[-1], cfg.proj_dim_time, cfg.proj_dim_vocab, self.seed
                )
            nuclear.append(torch.linalg.svdvals(logits).sum(-1).double().cpu())
            embed.append(self.projector.project(logits).reshape(logits.shape[0], -1).float().cpu())
        return torch.cat(nuclear), torch.cat(embed)

    def diversity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean Euclidean distance [N] from each embedding to the buffer (0 when it is empty)."""
        if self.buffer.shape[0] == 0:
            return torch.zeros(embeddings.shape[0], dtype=torch.float64)
        return torch.cdist(embeddings.double(), self.buffer.double()).mean(dim=1)

    def push(self, embeddings: torch.Tensor) -> None:
        """FIFO: append, overwriting the oldest once ``buffer_size`` is reached."""
        size = self.config.buffer_size
        for row in embeddings[-size:]:
            if self.buffer.shape[0] < size:
                self.buffer = torch.cat([self.buffer, row.unsqueeze(0)])
            else:
                self.buffer[self.pointer] = row
            self.pointer = (self.pointer + 1) % size

    @cleans_up
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        self.comm.reset()
        timings: dict[str, float] = {}
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        with timed(timings, "forward"):
            nuclear, embed = self._score_local(pool)
        with timed(timings, "select"):
            nuclear = distributed.all_gather_cat(nuclear, self.comm)
            embed = distributed.all_gather_cat(embed, self.comm)
            div = self.diversity(embed)
            score = nuclear + self.config.alpha * div
            chosen, _ = agree(topk(score, self.config.budget), min(self.config.budget, sum(sizes)), self.comm)
            self.push(embed[chosen])
        diagnostics = {
            "comm_bytes": self.comm.bytes,
            "buffer_fill": int(self.buffer.shape[0]),
            "nuclear_mean": float(nuclear.mean()),
            "diversity_mean": float(div.mean()),
        }
        return uniform_selection(chosen, sizes, timings, diagnostics, utility=score)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.clone(), "pointer": self.pointer, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"seed: checkpoint's UDS projection seed {state['seed']} != this run's {self.seed}")
        self.buffer = state["buffer"].clone().float()
        self.pointer = int(state["pointer"])


@register_selector("uds")
def build_uds(
    *, model: nn.Module, budget: int, seed: int = 0, config: UDSConfig | None = None, optimizer: Any = None, **_: Any
) -> UDS:
    config = config if config is not None else UDSConfig(budget=budget)
    if config.budget != budget:
        raise ValueError(f"budget: UDSConfig.budget={config.budget} disagrees with the selection budget {budget}")
    return UDS(model, config, seed=seed, optimizer=optimizer)


build_uds.config_class = UDSConfig  # type: ignore[attr-defined]
