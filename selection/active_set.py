"""The default QP solver of the weight step (docs/design.md#utility-filter-qp): a primal active-set method in float64
NumPy. max_w bᵀw − (τ/2) wᵀKw s.t. w ≥ 0, Σw = 1, (w ≤ cap); a few dozen small KKT solves at m = 32
(≈0.1–0.5 ms measured, ``benchmarks/speed.py``)."""

from __future__ import annotations

import numpy as np
import torch

from optsel.selection.qp_result import QPResult


def active_set_qp(
    b: torch.Tensor,
    K: torch.Tensor,
    tau: float,
    cap: float | None = None,
    max_iter: int | None = None,
    tol: float = 1e-10,
) -> QPResult:
    """Default solver: a primal active-set method (single problem b [m], K [m, m]; float64 NumPy
    inside, the result on b's device).

    Starts from a feasible vertex (the best single candidate; with a cap, 1/n on the n best), then
    alternates: solve the equality-constrained problem on the free variables (one
    (|F|+1)-square linear solve), step to the first bound it hits (that variable joins the active
    set), or, at the free optimum, release the bound whose multiplier has the wrong sign. Stops when
    the KKT conditions hold (status "optimal"); a singular K_FF gets a 1e-10 relative ridge; after 2m
    iterations (degenerate faces of a singular K) bounds are released by Bland's rule. Each
    iteration adds or drops one variable, so m = 32 takes a few dozen small solves."""

    m = int(b.shape[0])
    bn = b.detach().double().cpu().numpy()
    Kn = K.detach().double().cpu().numpy()
    Kn = 0.5 * (Kn + Kn.T)
    if cap is not None and cap * m <= 1.0 + 1e-12:  # the only feasible point
        return QPResult(torch.full((m,), 1.0 / m, dtype=torch.float64, device=b.device), "optimal", 0)
    Q = tau * Kn
    ridge = 1e-10 * max(float(np.abs(np.diag(Q)).max()), 1e-300)
    hi = np.inf if cap is None else float(cap)
    w = _feasible_start(bn, Q, hi)
    lower, upper = w <= 0.0, w >= hi
    g = Q @ w - bn  # gradient of the minimized −objective
    gscale = max(float(np.abs(Q).max() + np.abs(bn).max()), 1e-300)
    limit = max_iter if max_iter is not None else 20 * m + 50
    for it in range(1, limit + 1):
        F = np.flatnonzero(~(lower | upper))
        nf = F.size
        if nf > 1:  # the optimum on the current face: one KKT solve
            kkt = np.zeros((nf + 1, nf + 1))
            kkt[:nf, :nf] = Q[F[:, None], F]
            kkt[:nf, :nf].flat[:: nf + 2] += ridge
            kkt[:nf, nf] = kkt[nf, :nf] = 1.0
            sol = np.linalg.solve(kkt, np.append(-g[F], 0.0))
            p, nu = sol[:nf], float(sol[nf])
            alpha, block, to_upper = 1.0, -1, False
            neg = p < -tol
            if neg.any():
                ratios = -w[F[neg]] / p[neg]
                j = int(np.argmin(ratios))
                if ratios[j] < alpha:
                    alpha, block, to_upper = float(ratios[j]), int(F[neg][j]), False
            pos = p > tol
            if cap is not None and pos.any():
                ratios = (hi - w[F[pos]]) / p[pos]
                j = int(np.argmin(ratios))
                if ratios[j] < alpha:
                    alpha, block, to_upper = float(ratios[j]), int(F[pos][j]), True
            w[F] += alpha * p
            g += alpha * (Q[:, F] @ p)
            if block >= 0:  # a bound blocks the step: it joins the active set
                w[block] = hi if to_upper else 0.0
                (upper if to_upper else lower)[block] = True
                continue
        elif nf == 1:
            nu = float(-g[F[0]])
        else:  # every variable at a bound: ν may lie anywhere in [max over zeros of −g, min over caps of −g]
            lo_nu = float((-g[lower]).max()) if lower.any() else -np.inf
            hi_nu = float((-g[upper]).min()) if upper.any() else np.inf
            nu = lo_nu if not np.isfinite(hi_nu) else hi_nu if not np.isfinite(lo_nu) else 0.5 * (lo_nu + hi_nu)
        mult = g + nu  # KKT: ≥ 0 at a zero, ≤ 0 at the cap
        viol = np.where(lower, -mult, 0.0) + np.where(upper, mult, 0.0)
        j = int(np.argmax(viol))
        if viol[j] <= 1e-9 * gscale:
            return QPResult(_to_weights(w, b.device), "optimal", it)
        if it > 2 * m:  # long runs mean degenerate faces (singular K): Bland's rule cannot cycle
            j = int(np.flatnonzero(viol > 1e-9 * gscale)[0])
        lower[j] = upper[j] = False  # release the most violated bound
    return QPResult(_to_weights(w, b.device), "inaccurate", limit)


def _to_weights(w, device: torch.device) -> torch.Tensor:
    out = torch.from_numpy(np.clip(w, 0.0, None)).to(device)
    return out / out.sum()


def _feasible_start(b, Q, hi):
    """A feasible vertex-like start: all mass on the best single candidate (max b_j − Q_jj/2), or,
    with a cap, 1/n on the n = ⌈1/cap⌉ best ones."""

    score = b - 0.5 * np.diag(Q)
    n = 1 if not np.isfinite(hi) else int(np.ceil(1.0 / hi - 1e-12))
    top = np.argsort(-score, kind="stable")[:n]
    w = np.zeros_like(b)
    w[top] = 1.0 / n
    return w
