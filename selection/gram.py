"""Preconditioned Gram K_ij = ⟨P^½ g_i, P^½ g_j⟩ per layer, three backends (docs/design.md#factored-gradients).

- ``exact``: materialize P^½ ⊙ G_i (G_i = Δ_iᵀ A_i) in chunks, GEMM. Works per block [rows, cols]
  of the [d_out, d_in] matrix and returns partial sums (summed over blocks / ranks).
- ``ghost``: P replaced by its rank-one fit P ≈ r cᵀ (:func:`rank_one_factors`, Adafactor-style
  row/column means normalized; exact when P is rank one), K_ij = ⟨Δ_i R Δ_jᵀ, A_i C A_jᵀ⟩_F, the T×T
  form, cost O(T²(d_in+d_out)) per pair.
- ``sketch``: Kronecker random projections of the rank-one-scaled factors (LoGra-style),
  S_i = (Π_o R^½ Δ_iᵀ)(A_i C^½ Π_iᵀ) [k_o, k_i]; E⟨S_i, S_j⟩ = the ghost K_ij (Π entries N(0, 1/k)).
  Linear in T; the sketches are what crosses ranks cheaply. Its error is the ghost's rank-one
  approximation of P plus the projection's O(1/sqrt(k)) noise.
``auto`` picks per layer by the cost model of selection/cost_model.py (bytes and FLOPs, counting N, m,
R and the exchange): the most accurate backend within a factor of the cheapest.
"""

from __future__ import annotations

from typing import get_args

import torch

from optsel import distributed
from optsel.selection.cost_model import LayerShape, backend_for
from optsel.selection.ftw_config import GramBackend
from optsel.selection.layers import CoveredLayer
from optsel.selection.preconditioner import LayerBlock, LayerGeometry, empty_block

BACKENDS = get_args(GramBackend)


def auto_backend(exchange: str, shape: LayerShape, max_ghost_elems: int) -> str:
    """``gram: auto`` for one layer: :func:`optsel.selection.cost_model.backend_for` (bytes and FLOPs of
    the step for ``shape``'s pool N, m survivors, R ranks and ``exchange``; ghost only while T² fits
    ``max_ghost_elems``)."""
    return backend_for(exchange, shape, max_ghost_elems)


def _grads(A: torch.Tensor, D: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """Per-sample gradient blocks [n, r, c] = Δ[:, :, rows]ᵀ A[:, :, cols]."""
    return D[..., rows].transpose(1, 2) @ A[..., cols]


def _chunk_for(elems_per_sample: int, max_elems: int) -> int:
    return max(1, max_elems // max(elems_per_sample, 1))


def _flat_grad_chunks(A: torch.Tensor, D: torch.Tensor, blk: LayerBlock, max_elems: int):
    """(sample slice, its gradient blocks [chunk, r·c]) over ``A``'s samples, chunk·r·c ≤ max_elems."""
    r, c = blk.precond.shape
    step = _chunk_for(r * c, max_elems)
    for s in range(0, A.shape[0], step):
        yield slice(s, s + step), _grads(A[s : s + step], D[s : s + step], blk.rows, blk.cols).reshape(-1, r * c)


def exact_diag_partial(A: torch.Tensor, D: torch.Tensor, blk: LayerBlock, max_elems: int = 1 << 24) -> torch.Tensor:
    """Partial K_ii = Σ_block P ⊙ G_i² over one block, [n]."""
    out = torch.empty(A.shape[0], dtype=blk.precond.dtype, device=blk.precond.device)
    p_flat = blk.precond.reshape(-1)
    for rows, g in _flat_grad_chunks(A, D, blk, max_elems):
        out[rows] = g.square_() @ p_flat
    return out


def exact_alignment_and_diag_partial(
    A: torch.Tensor, D: torch.Tensor, M: torch.Tensor, blk: LayerBlock, max_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (b_i = ⟨M, G_i⟩, K_ii = ⟨P, G_i²⟩) over one block, two [n]: each G_i is formed once
    and serves both, so the exact backend's alignment costs no GEMM of its own (n·T·r·c to form,
    2·n·r·c for the two dot products). M [r, c]: selection/alignment.py's target direction."""
    b = torch.empty(A.shape[0], dtype=blk.precond.dtype, device=blk.precond.device)
    diag = torch.empty_like(b)
    m_flat, p_flat = M.reshape(-1).to(blk.precond.dtype), blk.precond.reshape(-1)
    for rows, g in _flat_grad_chunks(A, D, blk, max_elems):
        b[rows] = g @ m_flat
        diag[rows] = g.square_() @ p_flat
    return b, diag


def exact_gram_partial(A: torch.Tensor, D: torch.Tensor, blk: LayerBlock, max_elems: int = 1 << 24) -> torch.Tensor:
    """Partial K [n, n] over one block: Σ over column slabs of (P^½ ⊙ G)(P^½ ⊙ G)ᵀ. Each slab holds
    all n samples' [r, c_s] gradient pieces (n·r·c_s ≤ max_elems), so every gradient entry is formed
    once: cost n·T·r·c to form, n²·r·c for the products."""
    n = A.shape[0]
    r, c = blk.precond.shape
    half = blk.precond.sqrt()
    K = torch.zeros(n, n, dtype=half.dtype, device=half.device)
    if n == 0 or r * c == 0:
        return K
    width = max(1, min(c, max_elems // max(n * r, 1)))
    col0 = blk.cols.start or 0
    for s in range(0, c, width):
        cols = slice(col0 + s, col0 + min(s + width, c))
        z = (_grads(A, D, blk.rows, cols) * half[:, s : s + width]).reshape(n, -1)
        K += z @ z.T
    return K


def rank_one_partials(blocks: list[LayerBlock], d_out: int, d_in: int) -> torch.Tensor:
    """Row sums [d_out], column sums [d_in] and the total of P over this rank's blocks, packed
    into one vector [d_out + d_in + 1] (all-reduce it, then :func:`rank_one_from_sums`)."""
    ref = blocks[0].precond
    rows = torch.zeros(d_out, dtype=ref.dtype, device=ref.device)
    cols = torch.zeros(d_in, dtype=ref.dtype, device=ref.device)
    total = torch.zeros(1, dtype=ref.dtype, device=ref.device)
    for blk in blocks:
        rows[blk.rows] += blk.precond.sum(dim=1)
        cols[blk.cols] += blk.precond.sum(dim=0)
        total += blk.precond.sum()
    return torch.cat([rows, cols, total])


def rank_one_from_sums(sums: torch.Tensor, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [d_out], c [d_in]) with P ≈ r cᵀ: r = row means, c = column means / overall mean.
    Exact when P = u vᵀ (then r cᵀ = u vᵀ)."""
    rows, cols, total = sums[:d_out], sums[d_out : d_out + d_in], sums[-1]
    mean = total / (d_out * d_in)
    return rows / d_in, (cols / d_out) / mean.clamp(min=torch.finfo(sums.dtype).tiny)


def rank_one_factors(
    blocks: list[LayerBlock],
    d_out: int,
    d_in: int,
    sharded: bool = False,
    counter: distributed.CommCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one fit of P from this rank's blocks; with ``sharded`` blocks (disjoint over ranks)
    one all-reduce of O(d_in + d_out) floats."""
    sums = rank_one_partials(blocks, d_out, d_in)
    sums = distributed.all_reduce_sum(sums, counter) if sharded else sums
    return rank_one_from_sums(sums, d_out, d_in)


def layer_rank_one_factors(
    geometry: LayerGeometry,
    layer: CoveredLayer,
    dtype: torch.dtype,
    device: torch.device,
    sharded: bool,
    counter: distributed.CommCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank_one_factors` of one covered layer's P from this rank's blocks of ``geometry`` (an empty
    block, ``dtype`` on ``device``, where this rank holds none): (r [d_out], c [d_in])."""
    blocks = geometry.blocks or [empty_block(dtype, device)]
    return rank_one_factors(blocks, layer.d_out, layer.d_in, sharded, counter)


def ghost_diag(
    A: torch.Tensor, D: torch.Tensor, r: torch.Tensor, c: torch.Tensor, max_elems: int = 1 << 24
) -> torch.Tensor:
    """K_ii = ⟨Δ_i R Δ_iᵀ, A_i C A_iᵀ⟩_F, [n]."""
    n, T = A.shape[:2]
    step = _chunk_for(T * T, max_elems)
    out = torch.empty(n, dtype=r.dtype, device=r.device)
    for s in range(0, n, step):
        a, d = A[s : s + step].to(r.dtype), D[s : s + step].to(r.dtype)
        dd = (d * r) @ d.transpose(1, 2)
        aa = (a * c) @ a.transpose(1, 2)
        out[s : s + step] = (dd * aa).sum(dim=(1, 2))
    return out


def ghost_gram(
    A: torch.Tensor, D: torch.Tensor, r: torch.Tensor, c: torch.Tensor, max_elems: int = 1 << 24
) -> torch.Tensor:
    """K [n, n] with K_ij = ⟨Δ_i R Δ_jᵀ, A_i C A_jᵀ⟩_F; temporaries of (chunk·T)² elements."""
    n, T = A.shape[:2]
    A, D = A.to(r.dtype), D.to(r.dtype)
    step = max(1, int((max_elems**0.5) // max(T, 1)))
    K = torch.empty(n, n, dtype=r.dtype, device=r.device)
    for i in range(0, n, step):
        di = (D[i : i + step] * r).reshape(-1, D.shape[-1])
        ai = (A[i : i + step] * c).reshape(-1, A.shape[-1])
        ni = di.shape[0] // T
        for j in range(i, n, step):
            dj = D[j : j + step].reshape(-1, D.shape[-1])
            aj = A[j : j + step].reshape(-1, A.shape[-1])
            nj = dj.shape[0] // T
            prod = (di @ dj.T) * (ai @ aj.T)
            block = prod.reshape(ni, T, nj, T).sum(dim=(1, 3))
            K[i : i + ni, j : j + nj] = block
            K[j : j + nj, i : i + ni] = block.T
    return K


def sketch_projections(
    d_out: int, d_in: int, k_out: int, k_in: int, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian Π_o [k_out, d_out], Π_i [k_in, d_in] with N(0, 1/k) entries, from ``seed`` (CPU RNG,
    so every rank and device draws the same)."""
    gen = torch.Generator().manual_seed(int(seed))
    po = torch.randn(k_out, d_out, generator=gen, dtype=torch.float64) / k_out**0.5
    pi = torch.randn(k_in, d_in, generator=gen, dtype=torch.float64) / k_in**0.5
    return po.to(device=device, dtype=dtype), pi.to(device=device, dtype=dtype)


def sketch(
    A: torch.Tensor, D: torch.Tensor, r: torch.Tensor, c: torch.Tensor, proj_out: torch.Tensor, proj_in: torch.Tensor
) -> torch.Tensor:
    """S_i = (Π_o R^½ Δ_iᵀ)(A_i C^½ Π_iᵀ), [n, k_out, k_in]; cost linear in T."""
    left = D.to(r.dtype) @ (r.clamp(min=0).sqrt()[:, None] * proj_out.T)  # [n, T, k_out]
    right = A.to(r.dtype) @ (c.clamp(min=0).sqrt()[:, None] * proj_in.T)  # [n, T, k_in]
    return left.transpose(1, 2) @ right


def sketch_gram(S: torch.Tensor) -> torch.Tensor:
    flat = S.reshape(S.shape[0], -1)
    return flat @ flat.T


def condition_number(K: torch.Tensor) -> float:
    """λmax / λmin of the symmetric K (inf when singular or not finite)."""
    if K.numel() == 0:
        return 1.0
    if not torch.isfinite(K).all():
        return float("inf")
    eig = torch.linalg.eigvalsh(0.5 * (K + K.T).double())
    lo, hi = float(eig[0]), float(eig[-1])
    return hi / lo if lo > 0 else float("inf")
