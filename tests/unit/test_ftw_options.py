"""FTW's studied options against brute force (explicit per-sample gradients, explicit P): cosine
alignment, the batch-share filter curvature, the ESS floor as a weight cap, proportional weighting and
the random warm-up."""

from __future__ import annotations

import pytest
import torch

from optsel.selection import FilterThenWeight, FTWConfig
from optsel.selection.solvers import cvxpy_qp

from support.bruteforce import brute_force, trained_llama

N = 10


@pytest.fixture(scope="module")
def trained():
    return trained_llama(seed=5, steps=4, pool_size=N, betas=(0.9, 0.99))


def _brute(model, opt, pool, target, sel):
    return brute_force(
        model, opt, pool, target, sel.covered, sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    )


def _rel(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def test_cosine_alignment_is_unit_norm_gradients(trained):
    model, opt, pool, target = trained
    sel = FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=N, gram="exact", alignment="cosine")).select(
        pool, target
    )
    b, K, _ = _brute(model, opt, pool, target, sel)
    norms = K.diagonal().sqrt()
    b_cos, K_cos = b / norms, K / torch.outer(norms, norms)
    tau = sel.diagnostics["curvature"]
    assert _rel(sel.alignment, b_cos) < 1e-6
    assert _rel(sel.utility, b_cos - 0.5 * tau / 3) < 1e-6  # K_ii = 1; default filter_curvature "batch", k = 3
    f = sel.filtered
    assert _rel(sel.gram, K_cos[f][:, f]) < 1e-6
    assert torch.allclose(sel.gram.diagonal().double(), torch.ones(f.numel(), dtype=torch.float64), atol=1e-6)


def test_batch_filter_curvature_is_the_sample_share_of_k(trained):
    model, opt, pool, target = trained
    k = 4
    assert FTWConfig(budget=k).filter_curvature == "batch"  # the default since the quality grid
    sel = FilterThenWeight(
        model, opt, FTWConfig(budget=k, filter_size=6, gram="exact", filter_curvature="batch")
    ).select(pool, target)
    single = FilterThenWeight(
        model, opt, FTWConfig(budget=k, filter_size=6, gram="exact", filter_curvature="sample")
    ).select(pool, target)
    b, K, _ = _brute(model, opt, pool, target, sel)
    tau = sel.diagnostics["curvature"]
    u = b - 0.5 * (tau / k) * K.diagonal()
    assert _rel(sel.utility, u) < 1e-6
    assert _rel(single.utility, b - 0.5 * tau * K.diagonal()) < 1e-6
    order = torch.sort(u, descending=True).indices
    positive = int((u > 0).sum())
    expected = order[: min(6, positive)] if positive >= k else order[:k]  # the filter's rule, fallback included
    assert sorted(sel.filtered.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_ess_fraction_caps_weights_exactly(trained, fraction):
    model, opt, pool, target = trained
    k = 4
    cfg = FTWConfig(budget=k, filter_size=N, gram="exact", ess_fraction=fraction, curvature=0.02)
    assert cfg.weight_cap(k) == pytest.approx(1.0 / (fraction * k))
    sel = FilterThenWeight(model, opt, cfg).select(pool, target)
    w = sel.weights.double()
    cap = 1.0 / (fraction * k)
    assert float(w.max()) <= cap + 1e-6 and float(w.sum()) == pytest.approx(1.0)
    assert float(1.0 / w.square().sum()) >= fraction * k - 1e-4  # ESS >= fraction * k
    # the weights are cvxpy's optimum of the capped QP on the chosen support
    b, K, _ = _brute(model, opt, pool, target, sel)
    idx = sel.indices
    ref = cvxpy_qp(b[idx], K[idx][:, idx], 0.02, cap if cap * idx.numel() >= 1 else None).w
    assert torch.allclose(w, ref, atol=2e-4)
    with pytest.raises(ValueError, match="^ess_fraction: "):
        FTWConfig(budget=4, ess_fraction=0.0)


def test_proportional_weighting_draws_k_from_the_qp_solution(trained):
    model, opt, pool, target = trained
    k = 4
    cfg = FTWConfig(budget=k, filter_size=8, gram="exact", weighting="proportional", curvature=0.02)
    first = FilterThenWeight(model, opt, cfg, seed=7).select(pool, target)
    again = FilterThenWeight(model, opt, cfg, seed=7).select(pool, target)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.weights, again.weights)
    counts = first.weights * k
    assert torch.allclose(counts, counts.round(), atol=1e-9) and float(first.weights.sum()) == pytest.approx(1.0)
    assert first.indices.numel() <= k and set(first.indices.tolist()) <= set(first.filtered.tolist())
    # the draws follow the QP solution on all m survivors (no top-k cut): its support holds every pick
    b, K, _ = _brute(model, opt, pool, target, first)
    f = first.filtered
    qp = cvxpy_qp(b[f], K[f][:, f], 0.02).w
    support = set(f[qp > 1e-6].tolist())
    assert set(first.indices.tolist()) <= support


def test_warmup_selects_at_random_then_ftw_and_resumes(trained):
    model, opt, pool, target = trained
    cfg = FTWConfig(budget=3, filter_size=6, gram="exact", warmup_steps=2)
    ftw = FilterThenWeight(model, opt, cfg, seed=3)
    warm = [ftw.select(pool, target) for _ in range(2)]
    for sel in warm:
        assert sel.diagnostics["warmup"] and sel.alignment is None and sel.indices.numel() == 3
        assert torch.allclose(sel.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    state = ftw.state_dict()
    after = ftw.select(pool, target)
    assert not after.diagnostics["warmup"] and after.alignment is not None
    resumed = FilterThenWeight(model, opt, cfg, seed=99)
    resumed.load_state_dict(state)
    again = resumed.select(pool, target)
    assert torch.equal(after.indices, again.indices) and torch.allclose(after.weights, again.weights)
    with pytest.raises(ValueError, match="^warmup_steps: "):
        FTWConfig(budget=3, warmup_steps=-1)


@pytest.mark.parametrize("name", ["gram", "geometry", "weighting", "prefilter_stage2"])
def test_a_bad_option_built_in_python_lists_the_literal_values(name):
    from typing import get_args, get_type_hints

    allowed = get_args(get_type_hints(FTWConfig)[name])
    assert len(allowed) >= 2
    with pytest.raises(ValueError, match=f"^{name}: must be one of ") as info:
        FTWConfig(budget=3, **{name: "bogus"})
    assert str(info.value) == f"{name}: must be one of {allowed}, got 'bogus'"
