"""Weight: max_w bᵀw − (τ/2) wᵀKw  s.t. w ≥ 0, Σw = 1, (w ≤ w_max), at most k non-zeros (docs/design.md#utility-filter-qp).

Three interchangeable QP solvers (same optimum; tests hold them together):
- ``active_set`` (default, selection/active_set.py): a primal active-set method in float64 NumPy, a
  few dozen small KKT solves (≈0.1–0.5 ms at m = 32 measured; ``benchmarks/speed.py`` prints the table). Should it stop
  without verifying the KKT conditions (seen only on a singular K with most weights at a tight cap),
  cvxpy/CLARABEL solves that problem instead.
- ``torch``: batched FISTA with projection onto the (capped) simplex, then an exact KKT
  polish on the active set (a few primal active-set iterations, each one small linear solve).
- ``cvxpy``: OSQP on ``quad_form(w, psd_wrap(K))``, the reference.
Support selection to ≤ k non-zeros: ``topk`` (solve on all m, keep the k largest, re-fit on that
support) or ``greedy`` (OMP-style forward selection, adding the candidate with the largest marginal
gain, non-negative re-fit after each addition). A non-finite problem or a solver failure falls back
to uniform weights over the top k by utility — counted by the caller, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch

from optsel.selection.active_set import active_set_qp
from optsel.selection.ftw_config import Solver
from optsel.selection.qp_result import QPResult

SOLVERS = get_args(Solver)
SUPPORTS = ("topk", "greedy")


def objective(w: torch.Tensor, b: torch.Tensor, K: torch.Tensor, tau: float) -> torch.Tensor:
    """bᵀw − (τ/2) wᵀKw (to maximize); batched over leading dims."""
    Kw = (K @ w.unsqueeze(-1)).squeeze(-1)
    return (b * w).sum(-1) - 0.5 * tau * (w * Kw).sum(-1)


def project_simplex(v: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """Euclidean projection of v [..., m] onto {w ≥ 0, Σw = 1, w ≤ cap}."""
    if cap is None or cap * v.shape[-1] <= 1.0 + 1e-12:
        if cap is not None:  # cap * m == 1: the only feasible point
            return torch.full_like(v, 1.0 / v.shape[-1])
        u = torch.sort(v, dim=-1, descending=True).values
        css = u.cumsum(-1) - 1.0
        idx = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
        cond = (u - css / idx) > 0
        rho = (cond * idx).argmax(-1, keepdim=True)  # last position where the condition holds
        theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
        return (v - theta).clamp(min=0.0)
    lo = v.min(-1, keepdim=True).values - cap
    hi = v.max(-1, keepdim=True).values
    for _ in range(100):  # bisection on the threshold: Σ clamp(v − θ, 0, cap) = 1
        mid = 0.5 * (lo + hi)
        s = (v - mid).clamp(0.0, cap).sum(-1, keepdim=True)
        lo = torch.where(s > 1.0, mid, lo)
        hi = torch.where(s > 1.0, hi, mid)
    return (v - 0.5 * (lo + hi)).clamp(0.0, cap)


def _lipschitz(K: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Upper estimate of λmax(K) [...] by power iteration (×1.05 + tiny)."""
    x = torch.ones(K.shape[:-1], dtype=K.dtype, device=K.device)
    lam = torch.zeros(K.shape[:-2], dtype=K.dtype, device=K.device)
    for _ in range(iters):
        y = (K @ x.unsqueeze(-1)).squeeze(-1)
        lam = y.norm(dim=-1)
        x = y / lam.clamp(min=1e-300).unsqueeze(-1)
    return lam * 1.05 + 1e-12


def fista(
    b: torch.Tensor,
    K: torch.Tensor,
    tau: float,
    cap: float | None = None,
    max_iter: int = 3000,
    tol: float = 1e-12,
    w0: torch.Tensor | None = None,
    lipschitz: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Batched accelerated projected gradient with adaptive restart. b [B, m], K [B, m, m] →
    (w [B, m], iterations). Stops when the projected-gradient step at w moves it less than ``tol``."""
    lip = lipschitz if lipschitz is not None else _lipschitz(K)
    step = 1.0 / (tau * lip).clamp(min=1e-300).unsqueeze(-1)
    w = project_simplex(torch.zeros_like(b) if w0 is None else w0, cap)
    y, t = w.clone(), 1.0
    prev_obj = objective(w, b, K, tau)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007  (the count is reported after the loop)
        grad = tau * (K @ y.unsqueeze(-1)).squeeze(-1) - b  # gradient of the minimized −objective
        w_next = project_simplex(y - step * grad, cap)
        obj = objective(w_next, b, K, tau)
        restart = obj < prev_obj  # adaptive restart (O'Donoghue & Candès) on objective decrease
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = torch.where(restart.unsqueeze(-1), w_next, w_next + ((t - 1.0) / t_next) * (w_next - w))
        if bool(restart.any()):
            t_next = 1.0
        delta = float((w_next - w).abs().max())
        w, t, prev_obj = w_next, t_next, torch.maximum(obj, prev_obj)
        if delta < tol:  # confirm a fixed point of the plain projected-gradient map at w
            g = tau * (K @ w.unsqueeze(-1)).squeeze(-1) - b
            if float((project_simplex(w - step * g, cap) - w).abs().max()) < tol:
                break
            y, t = w.clone(), 1.0
    return w, it


def kkt_polish(
    w0: torch.Tensor,
    b: torch.Tensor,
    K: torch.Tensor,
    tau: float,
    cap: float | None = None,
    max_rounds: int = 50,
    tol: float = 1e-9,
) -> tuple[torch.Tensor, bool]:
    """Exact solution on the active set of ``w0`` (single problem, [m]); returns (w, KKT verified).

    Free set F (0 < w < cap) solves τK_FF w_F + τK_FU cap − b_F + ν1 = 0, 1ᵀw_F = 1 − |U| cap; then
    variables leave F when they go negative / above the cap, and enter it when their multiplier has
    the wrong sign, until the KKT conditions hold."""
    m = w0.shape[0]
    scale = max(float(w0.max()), 1.0 / m)
    free = w0 > 1e-7 * scale
    upper = torch.zeros_like(free) if cap is None else (w0 >= cap - 1e-9)
    free &= ~upper
    gscale = float((tau * K.abs().max() + b.abs().max()).clamp(min=1e-300))
    for _ in range(max_rounds):
        F = free.nonzero().squeeze(-1)
        U = upper.nonzero().squeeze(-1)
        w = torch.zeros_like(w0)
        if cap is not None:
            w[U] = cap
        nf = F.numel()
        if nf == 0:
            return w0, False
        rhs_mass = 1.0 - (U.numel() * cap if cap is not None else 0.0)
        sys = torch.zeros(nf + 1, nf + 1, dtype=K.dtype, device=K.device)
        sys[:nf, :nf] = tau * K[F][:, F]
        sys[:nf, nf] = 1.0
        sys[nf, :nf] = 1.0
        rhs = torch.empty(nf + 1, dtype=K.dtype, device=K.device)
        rhs[:nf] = b[F] - (tau * K[F][:, U] @ w[U] if U.numel() else 0.0)
        rhs[nf] = rhs_mass
        sol = torch.linalg.lstsq(sys, rhs.unsqueeze(-1), driver="gelsd" if K.device.type == "cpu" else None)
        sol = sol.solution.squeeze(-1)
        wf, nu = sol[:nf], sol[nf]
        if (wf < -tol).any():
            free[F[wf.argmin()]] = False
            continue
        if cap is not None and (wf > cap + tol).any():
            top = F[wf.argmax()]
            free[top], upper[top] = False, True
            continue
        w[F] = wf.clamp(min=0.0)
        g = tau * (K @ w) - b + nu  # multipliers: g_j = μ_j ≥ 0 at zero, ≤ 0 at the cap
        at_zero = ~(free | upper)
        viol_zero = torch.where(at_zero, -g, torch.zeros_like(g))
        viol_cap = torch.where(upper, g, torch.zeros_like(g))
        worst = torch.maximum(viol_zero, viol_cap)
        if float(worst.max()) <= tol * gscale:
            return w, True
        j = int(worst.argmax())
        free[j], upper[j] = True, False
    return w0, False


def torch_qp(b: torch.Tensor, K: torch.Tensor, tau: float, cap: float | None = None, max_iter: int = 5000) -> QPResult:
    """Default solver: FISTA in rounds of growing length, each followed by an exact KKT polish on
    its active set; stops as soon as the polished point satisfies the KKT conditions
    (single problem b [m], K [m, m]; float64 inside)."""
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    b64, K64 = b.double(), (0.5 * (K + K.T)).double()
    bb, KK = b64.unsqueeze(0), K64.unsqueeze(0)
    lip = _lipschitz(KK)
    w: torch.Tensor | None = None
    total, rounds = 0, 50
    while total < max_iter:
        w, iters = fista(bb, KK, tau, cap, max_iter=min(rounds, max_iter - total), w0=w, lipschitz=lip)
        total += iters
        polished, ok = kkt_polish(w.squeeze(0), b64, K64, tau, cap)
        if ok:
            return QPResult(_renormalize(polished), "optimal", total)
        if iters < rounds:  # FISTA converged but the polish could not verify: keep FISTA's point
            break
        rounds *= 2
    assert w is not None  # max_iter >= 1: the loop ran at least once
    return QPResult(_renormalize(w.squeeze(0)), "inaccurate", total)


def cvxpy_qp(
    b: torch.Tensor, K: torch.Tensor, tau: float, cap: float | None = None, backend: str | None = None
) -> QPResult:
    """Reference via cvxpy: OSQP on ``quad_form(w, psd_wrap(K))`` (tight tolerances, polishing on).
    backend None: OSQP up to m = 512, CLARABEL (interior point) above — OSQP's first-order
    iterations crawl on dense m = 1024 problems (5–30 s measured, CLARABEL ~1.3 s, same optimum).
    Weights below 1e-9 of the largest are set to 0 (solver tolerance, not support)."""
    import cvxpy as cp  # heavy (scipy, solver backends): only this reference solver needs it  # noqa: PLC0415 - heavy: the reference solver only

    m = b.shape[0]
    backend = backend or ("OSQP" if m <= 512 else "CLARABEL")
    Kn = (0.5 * (K + K.T)).double().cpu().numpy()
    w = cp.Variable(m)
    cons = [w >= 0, cp.sum(w) == 1] + ([w <= cap] if cap is not None else [])
    prob = cp.Problem(cp.Maximize(b.double().cpu().numpy() @ w - 0.5 * tau * cp.quad_form(w, cp.psd_wrap(Kn))), cons)
    opts = dict(eps_abs=1e-10, eps_rel=1e-10, max_iter=400000, polish=True) if backend == "OSQP" else {}
    prob.solve(solver=backend, **opts)
    if w.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy/{backend} status {prob.status}")
    out = torch.from_numpy(np.clip(w.value, 0.0, None)).to(dtype=torch.float64, device=b.device)
    out[out < 1e-9 * out.max()] = 0.0
    return QPResult(_renormalize(out), str(prob.status))


def _renormalize(w: torch.Tensor) -> torch.Tensor:
    w = w.clamp(min=0.0)
    return w / w.sum()


def solve_qp(
    b: torch.Tensor, K: torch.Tensor, tau: float, cap: float | None = None, solver: str = "active_set"
) -> QPResult:
    if solver == "active_set":
        result = active_set_qp(b, K, tau, cap)
        if result.status == "optimal":
            return result
        try:  # rare (singular K, most weights at a tight cap): the interior-point reference finishes it
            finished = cvxpy_qp(b, K, tau, cap, backend="CLARABEL")
            finished.status = f"active_set {result.status}; finished by cvxpy/CLARABEL ({finished.status})"
            return finished
        except Exception:  # noqa: BLE001 - then FISTA + polish
            return torch_qp(b, K, tau, cap)
    if solver == "torch":
        return torch_qp(b, K, tau, cap)
    if solver == "cvxpy":
        return cvxpy_qp(b, K, tau, cap)
    raise ValueError(f"solver: must be one of {SOLVERS}, got {solver!r}")


@dataclass
class WeightResult:
    """support: [s] positions into the m filtered candidates; weights [s] (>= 0, sum 1)."""

    support: torch.Tensor
    weights: torch.Tensor
    status: str
    fallback: str | None = None


def uniform_topk(u: torch.Tensor, k: int) -> WeightResult:
    """Fallback: uniform weights on the top k by utility (non-finite utilities last)."""
    safe = torch.where(torch.isfinite(u), u, torch.full_like(u, -torch.inf))
    top = torch.sort(safe, descending=True, stable=True).indices[:k]
    return WeightResult(top, torch.full((top.numel(),), 1.0 / max(top.numel(), 1), dtype=torch.float64), "fallback")


def select_weights(
    b: torch.Tensor,
    K: torch.Tensor,
    u: torch.Tensor,
    tau: float,
    k: int,
    cap: float | None = None,
    solver: str = "active_set",
    support: str = "topk",
) -> WeightResult:
    """≤ k non-zero weights on the m filtered candidates (b [m], K [m, m], u [m] their utilities)."""
    if not (torch.isfinite(K).all() and torch.isfinite(b).all()):
        result = uniform_topk(u, k)
        result.fallback = "nonfinite_gram"
        return result
    try:
        if support == "greedy":
            result = _greedy(b, K, tau, k, cap, solver)
        elif support == "topk":
            result = _topk(b, K, tau, k, cap, solver)
        else:
            raise ValueError(f"support: must be one of {SUPPORTS}, got {support!r}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any solver failure becomes a counted fallback
        result = uniform_topk(u, k)
        result.fallback = "solver_error"
        result.status = f"fallback: {type(err).__name__}: {err}"[:200]
        return result
    if not (torch.isfinite(result.weights).all() and abs(float(result.weights.sum()) - 1.0) < 1e-6):
        result = uniform_topk(u, k)
        result.fallback = "solver_nonfinite"
    return result


def _restricted(b, K, idx, tau, cap, solver) -> QPResult:
    return solve_qp(b[idx], K[idx][:, idx], tau, cap, solver)


def _topk(b, K, tau, k, cap, solver) -> WeightResult:
    m = b.shape[0]
    full = solve_qp(b, K, tau, cap if cap is None or cap * m >= 1 else None, solver)
    support = full.w.nonzero().squeeze(-1)
    if support.numel() <= k:
        order = torch.sort(full.w[support], descending=True, stable=True).indices
        support = support[order]
        return WeightResult(support, full.w[support], full.status)
    keep = torch.sort(full.w, descending=True, stable=True).indices[:k]
    refit = _restricted(b, K, keep, tau, cap, solver)
    nz = refit.w > 0
    return WeightResult(keep[nz], refit.w[nz], refit.status)


def _greedy(b, K, tau, k, cap, solver) -> WeightResult:
    """OMP-style: start from the best single candidate, add the one with the largest marginal gain
    (b − τKw)_j − (b − τKw)ᵀw, re-fit non-negatively; stop at k or when nothing improves."""
    m = b.shape[0]
    chosen = [int(torch.argmax(b - 0.5 * tau * K.diagonal()))]
    w = torch.ones(1, dtype=torch.float64, device=b.device)
    status = "optimal"
    while len(chosen) < min(k, m):
        full_w = torch.zeros(m, dtype=torch.float64, device=b.device)
        full_w[chosen] = w
        h = b.double() - tau * (K.double() @ full_w)
        gain = h - (h * full_w).sum()
        gain[chosen] = -torch.inf
        j = int(torch.argmax(gain))
        if float(gain[j]) <= 1e-12 * max(float(h.abs().max()), 1e-300):
            break
        trial = chosen + [j]
        c = cap if cap is None or cap * len(trial) >= 1 else None
        res = _restricted(b, K, torch.tensor(trial, device=b.device), tau, c, solver)
        chosen, w, status = trial, res.w, res.status
    idx = torch.tensor(chosen, device=b.device)
    nz = w > 0
    return WeightResult(idx[nz], w[nz], status)
