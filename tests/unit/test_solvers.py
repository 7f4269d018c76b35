"""The weight QP: torch FISTA + KKT polish against cvxpy/OSQP, support selection, fallbacks."""

from __future__ import annotations

import pytest
import torch

from optsel.selection import solvers
from optsel.selection.solvers import active_set_qp, cvxpy_qp, objective, project_simplex, select_weights, torch_qp


def _problem(m: int, seed: int, rank: int | None = None, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    r = rank if rank is not None else max(2, m // 2)
    X = torch.randn(m, r, generator=gen, dtype=torch.float64)
    K = X @ X.T / r + (1e-3 * torch.eye(m, dtype=torch.float64) if rank is None else 0.0)
    b = scale * torch.randn(m, generator=gen, dtype=torch.float64)
    return b, K


def _kkt_ok(w, b, K, tau, cap=None, tol=1e-7) -> bool:
    """Stationarity with a common ν on the free set, correct multiplier signs elsewhere."""
    g = tau * (K @ w) - b
    scale = float(g.abs().max()) + 1e-12
    free = (w > 1e-9) & (w < (cap - 1e-9 if cap is not None else float("inf")))
    nu = -g[free].mean()
    ok = float((g[free] + nu).abs().max()) <= tol * scale if free.any() else True
    zero = w <= 1e-9
    ok &= bool(((g + nu)[zero] >= -tol * scale).all())
    if cap is not None:
        ok &= bool(((g + nu)[w >= cap - 1e-9] <= tol * scale).all())
    return bool(ok) and abs(float(w.sum()) - 1.0) < 1e-9 and float(w.min()) >= 0.0


@pytest.mark.parametrize("m,seed", [(5, 0), (20, 1), (64, 2), (64, 3), (256, 4), (1024, 5)])
def test_torch_matches_cvxpy(m, seed):
    b, K = _problem(m, seed)
    tau = 0.3
    mine, ref = torch_qp(b, K, tau), cvxpy_qp(b, K, tau)
    f_mine, f_ref = float(objective(mine.w, b, K, tau)), float(objective(ref.w, b, K, tau))
    assert f_mine >= f_ref - 1e-6 * max(abs(f_ref), 1e-12)
    assert abs(f_mine - f_ref) <= 1e-6 * max(abs(f_ref), 1e-12)
    assert mine.status == "optimal" and _kkt_ok(mine.w, b, K, tau)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_deficient_and_capped(seed):
    b, K = _problem(40, seed, rank=5)  # singular K: duplicated directions
    tau = 1.0
    mine, ref = torch_qp(b, K, tau), cvxpy_qp(b, K, tau)
    f_mine, f_ref = float(objective(mine.w, b, K, tau)), float(objective(ref.w, b, K, tau))
    assert abs(f_mine - f_ref) <= 1e-6 * max(abs(f_ref), 1e-12)
    cap = 0.15
    mine, ref = torch_qp(b, K, tau, cap), cvxpy_qp(b, K, tau, cap)
    f_mine, f_ref = float(objective(mine.w, b, K, tau)), float(objective(ref.w, b, K, tau))
    assert abs(f_mine - f_ref) <= 1e-6 * max(abs(f_ref), 1e-12)
    assert float(mine.w.max()) <= cap + 1e-9 and _kkt_ok(mine.w, b, K, tau, cap)


def test_batched_fista_and_projection():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 30, generator=gen, dtype=torch.float64) * 3
    for cap in (None, 0.1):
        w = project_simplex(v, cap)
        assert torch.allclose(w.sum(-1), torch.ones(7, dtype=torch.float64)) and (w >= 0).all()
        if cap is not None:
            assert (w <= cap + 1e-12).all()
        # projection optimality: v − w = θ on the free coordinates
        for row in range(7):
            free = (w[row] > 1e-12) & (w[row] < (cap or 2.0) - 1e-12)
            diff = (v[row] - w[row])[free]
            if free.any():
                assert float(diff.max() - diff.min()) < 1e-9
        # against the projection as a QP: min ||w − v||² = max (v − 0)ᵀw − ½wᵀIw − const
        ref = cvxpy_qp(v[0], torch.eye(30, dtype=torch.float64), 1.0, cap).w
        assert torch.allclose(w[0], ref, atol=1e-7)
    problems = [_problem(16, s) for s in range(4)]
    b = torch.stack([p[0] for p in problems])
    K = torch.stack([p[1] for p in problems])
    w, _ = solvers.fista(b, K, 0.5, max_iter=20000)
    for i, (bi, Ki) in enumerate(problems):
        ref = cvxpy_qp(bi, Ki, 0.5).w
        assert float(objective(w[i], bi, Ki, 0.5)) >= float(objective(ref, bi, Ki, 0.5)) - 1e-7


@pytest.mark.parametrize("support", ["topk", "greedy"])
def test_support_selection_refits_exactly(support):
    b, K = _problem(48, 7, scale=0.3)
    b = b + 0.5  # many candidates attractive: the unconstrained-support optimum is dense
    tau, k = 0.2, 5
    u = b - 0.5 * tau * K.diagonal()
    res = select_weights(b, K, u, tau, k, support=support)  # the default solver (active set)
    assert res.fallback is None and 1 <= res.support.numel() <= k
    assert (res.weights > 0).all() and abs(float(res.weights.sum()) - 1) < 1e-12
    s = res.support
    ref = cvxpy_qp(b[s], K[s][:, s], tau)
    f_res = float(objective(res.weights, b[s], K[s][:, s], tau))
    assert abs(f_res - float(objective(ref.w, b[s], K[s][:, s], tau))) <= 1e-6 * abs(f_res)
    with_cvxpy = select_weights(b, K, u, tau, k, solver="cvxpy", support=support)
    assert sorted(with_cvxpy.support.tolist()) == sorted(s.tolist())


def test_fallbacks_are_uniform_topk_and_counted(monkeypatch):
    b, K = _problem(12, 3)
    u = b - 0.5 * K.diagonal()
    top3 = u.argsort(descending=True)[:3]
    bad = K.clone()
    bad[2, 5] = float("nan")
    res = select_weights(b, bad, u, 1.0, 3)
    assert res.fallback == "nonfinite_gram"
    assert sorted(res.support.tolist()) == sorted(top3.tolist())
    assert torch.allclose(res.weights, torch.full((3,), 1 / 3, dtype=torch.float64))

    def broken(*args, **kwargs):
        raise RuntimeError("injected solver failure")

    monkeypatch.setattr(solvers, "active_set_qp", broken)
    res = select_weights(b, K, u, 1.0, 3)
    assert res.fallback == "solver_error" and "injected" in res.status
    assert sorted(res.support.tolist()) == sorted(top3.tolist())
    with pytest.raises(ValueError, match="support"):
        select_weights(b, K, u, 1.0, 3, support="nope")


def _ftw_like(m: int, seed: int, d: int = 200):
    """b, K as FTW forms them: K = G Gᵀ / d for m gradients of unequal norms (rank-deficient when
    m > d), b = G v."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, d, generator=gen, dtype=torch.float64) * torch.rand(m, 1, generator=gen, dtype=torch.float64)
    return G @ torch.randn(d, generator=gen, dtype=torch.float64) / d**0.5, G @ G.T / d


def _kkt_violation(w, b, K, tau, cap=None) -> float:
    """Largest KKT violation (relative): stationarity on the free set with one ν, multiplier signs at
    the bounds; ν from the free set, or the best ν in the feasible interval when none is free."""
    g = tau * (K @ w) - b
    hi = cap if cap is not None else float("inf")
    free, zero, top = (w > 1e-12) & (w < hi - 1e-12), w <= 1e-12, w >= hi - 1e-12
    if free.any():
        nu = -float(g[free].mean())
    else:
        lo = float((-g[zero]).max()) if zero.any() else -float("inf")
        up = float((-g[top]).min()) if top.any() else float("inf")
        nu = up if lo == -float("inf") else lo if up == float("inf") else 0.5 * (lo + up)
    viol = [
        float((g[free] + nu).abs().max()) if free.any() else 0.0,
        float((-(g + nu))[zero].clamp(min=0).max()) if zero.any() else 0.0,
        float((g + nu)[top].clamp(min=0).max()) if top.any() else 0.0,
    ]
    return max(viol) / (float(g.abs().max()) + 1e-300)


@pytest.mark.parametrize("m", [8, 32, 256])
@pytest.mark.parametrize("tau", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("cap", [None, 1 / 8])
def test_active_set_matches_cvxpy_and_is_kkt_exact(m, tau, cap):
    b, K = _ftw_like(m, seed=m + int(tau * 10))
    mine, ref = active_set_qp(b, K, tau, cap), cvxpy_qp(b, K, tau, cap)
    assert mine.status == "optimal"
    f_mine, f_ref = float(objective(mine.w, b, K, tau)), float(objective(ref.w, b, K, tau))
    assert f_mine >= f_ref - 1e-8 * max(abs(f_ref), 1e-12)  # never worse than OSQP at 1e-10 tolerances
    assert abs(float(mine.w.sum()) - 1.0) < 1e-12 and float(mine.w.min()) >= 0.0
    if cap is not None:
        assert float(mine.w.max()) <= cap + 1e-12
    assert _kkt_violation(mine.w, b, K, tau, cap) < 1e-8
    if m <= 32:  # K = G Gᵀ has full rank (d = 200 > m): the optimum is unique
        assert torch.allclose(mine.w, ref.w, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_active_set_on_singular_and_degenerate_problems(seed):
    b, K = _problem(40, seed, rank=5)  # singular Gram: duplicated directions
    for tau, cap in [(1.0, None), (1.0, 0.15), (0.01, None), (100.0, 0.05), (1.0, 1 / 40)]:
        # solve_qp: the active set, finished by cvxpy/CLARABEL when it cannot verify the KKT conditions
        # (seen only on singular K with most weights at a tight cap, e.g. τ = 100, cap = 0.05 here)
        mine, ref = solvers.solve_qp(b, K, tau, cap), cvxpy_qp(b, K, tau, cap, backend="CLARABEL")
        f_mine, f_ref = float(objective(mine.w, b, K, tau)), float(objective(ref.w, b, K, tau))
        assert f_mine >= f_ref - 1e-6 * max(abs(f_ref), 1e-12)
        if cap is None or cap >= 0.15:
            assert active_set_qp(b, K, tau, cap).status == "optimal"
    dup = torch.cat([b[:3], b[:3]])  # exact duplicates: ties in b and K
    Kd = K[[0, 1, 2, 0, 1, 2]][:, [0, 1, 2, 0, 1, 2]]
    mine = active_set_qp(dup, Kd, 1.0)
    ref = cvxpy_qp(dup, Kd, 1.0)
    assert abs(float(objective(mine.w, dup, Kd, 1.0)) - float(objective(ref.w, dup, Kd, 1.0))) < 1e-8
