"""The Muon grid's control geometries (FTWConfig.muon_model; selection/muon_geometry.py) against explicit
computations, float64, on a hybrid Muon + AdamW tiny Llama: "lowrank" (OPUS-style S = aI + bA + cA² built
here from the momentum buffer), "adam" (Adam's P from the squared gradients recorded here, m̂ = B/(1 − μ^t)),
"identity" (P = I). The AdamW layers keep the Adam geometry (geometry auto) in every case.
"""

from __future__ import annotations

import pytest
import torch

from optsel.pipeline.engines.muon import MuonAdamW, split_muon_params
from optsel.selection import FilterThenWeight, FTWConfig

from support.bruteforce import adam_precond, make_batch, per_sample_grads, tiny_llama
from support.muon import ADAM_LR, MUON_LR, _exact_ns, _hybrid, _real_update, _rel, _train


def _brute(model, muon, adamw, pool, target, names, rho, muon_block):
    """(b, K): AdamW layers by Adam's formula, Muon layers by ``muon_block(p, G [n, numel], gv [numel])``."""
    params = dict(model.named_parameters())
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    gp, gt = per_sample_grads(model, pool, names), per_sample_grads(model, target, names)
    n = len(gp)
    b, K = torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        p = params[name]
        G = torch.stack([g[name] for g in gp]).reshape(n, -1)
        gv = (sum(g[name] for g in gt) / len(gt)).reshape(-1)
        if id(p) in muon_ids:
            db, dK = muon_block(p, G, gv)
        else:
            P, mhat = (t.reshape(-1) for t in adam_precond(adamw, p))
            db, dK = G @ (P * (gv - rho * mhat)), (G * P) @ G.T
        b, K = b + db, K + dK
    return b, K


def _select(model, opt, pool, target, **options):
    cfg = FTWConfig(budget=3, filter_size=6, geometry="auto", **options)
    return FilterThenWeight(model, opt, cfg).select(pool, target)


@pytest.mark.parametrize("exchange", ["direction", "factors"])
def test_lowrank_against_explicit_S(exchange):
    model = tiny_llama()
    muon, adamw = opts = _hybrid(model, nesterov=True)
    _train(model, opts, 3)
    pool, target = make_batch(8, 9, seed=41), make_batch(3, 7, seed=42)
    sel = _select(model, opts, pool, target, muon_model="lowrank", exchange=exchange)
    assert "muon" in sel.diagnostics["gram_backends"].values() and "lowrank" in sel.diagnostics["preconditioner"]
    rho, tau = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    from torch.optim._muon import _adjust_lr

    def block(p, G, gv):
        group = muon.param_groups[0]
        mu = group["momentum"]
        X0 = mu * mu * muon.state[p]["momentum_buffer"]  # nesterov: NS sees μ²B + (1 − μ²)g
        wide = X0 if X0.shape[0] <= X0.shape[1] else X0.T
        A = wide @ wide.T / wide.norm() ** 2
        a, bb, c = group["ns_coefficients"]
        S = (a * torch.eye(A.shape[0], dtype=A.dtype) + bb * A + c * A @ A) / wide.norm()
        scale = MUON_LR / ADAM_LR * float(_adjust_lr(1.0, group["adjust_lr_fn"], p.shape)) * (1 - mu * mu)

        def J(v):  # v [numel] → J v, param layout
            m = v.reshape(p.shape)
            return (scale * (S @ m if X0.shape[0] <= X0.shape[1] else m @ S)).reshape(-1)

        with _exact_ns() as seen:
            u0 = _real_update(muon, p)(torch.zeros_like(p)).reshape(-1)
        assert _rel(seen[0], X0) < 1e-12
        s = float(X0.reshape(-1) @ u0 / (u0 @ u0))
        JG = torch.stack([J(g) for g in G])
        return JG @ (gv - s * u0) / tau, s * JG @ JG.T / tau**2

    b, K = _brute(model, muon, adamw, pool, target, sel.covered, rho, block)
    f = sel.filtered
    assert _rel(sel.alignment, b) < 1e-6
    assert _rel(sel.gram, K[f][:, f]) < 1e-6
    exact = _select(model, opts, pool, target, exchange=exchange)  # a different map from the Jacobian's
    assert _rel(sel.alignment, exact.alignment) > 1e-3


def test_identity_on_muon_layers():
    model = tiny_llama()
    muon, adamw = opts = _hybrid(model)
    _train(model, opts, 2)
    pool, target = make_batch(8, 9, seed=51), make_batch(3, 7, seed=52)
    sel = _select(model, opts, pool, target, muon_model="identity")
    assert "muon" not in sel.diagnostics["gram_backends"].values()
    b, K = _brute(
        model,
        muon,
        adamw,
        pool,
        target,
        sel.covered,
        sel.diagnostics["momentum_coef"],
        lambda p, G, gv: (G @ gv, G @ G.T),
    )
    assert _rel(sel.alignment, b) < 1e-6
    assert _rel(sel.gram, K[sel.filtered][:, sel.filtered]) < 1e-6


@pytest.mark.parametrize("gram", ["exact", "ghost"])
def test_adam_model_tracks_squared_gradients_through_muon_adamw(gram):
    """The selector is built before training (its step pre-hook must see every step); the explicit v is the
    EMA of the gradients recorded here just before each MuonAdamW step."""
    from optsel.losses import per_sample_token_mean_ce

    model = tiny_llama()
    muon_params, adam_params = split_muon_params(model)
    betas, eps = (0.9, 0.99), 1e-8
    opt = MuonAdamW(
        muon_params,
        adam_params,
        muon=dict(lr=MUON_LR, momentum=0.9, nesterov=True),
        adamw=dict(lr=ADAM_LR, betas=betas, eps=eps, weight_decay=0.0),
    )
    ftw = FilterThenWeight(
        model, opt, FTWConfig(budget=3, filter_size=6, geometry="auto", muon_model="adam", gram=gram)
    )
    v = {id(p): torch.zeros_like(p) for p in muon_params}
    steps = 3
    for s in range(steps):
        batch = make_batch(6, 8, 100 + s)
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sample_token_mean_ce(logits, batch["labels"]).loss.mean().backward()
        for p in muon_params:
            v[id(p)] = betas[1] * v[id(p)] + (1 - betas[1]) * p.grad.detach() ** 2
        opt.step()
    opt.zero_grad(set_to_none=True)
    pool, target = make_batch(8, 9, seed=61), make_batch(3, 7, seed=62)
    sel = ftw.select(pool, target)
    rho = sel.diagnostics["momentum_coef"]
    mu = 0.9

    def block(p, G, gv):
        P = 1.0 / ((v[id(p)] / (1 - betas[1] ** steps)).sqrt() + eps)
        mhat = opt.state[p]["momentum_buffer"] / (1 - mu**steps)
        P, mhat = P.reshape(-1), mhat.reshape(-1)
        return G @ (P * (gv - rho * mhat)), (G * P) @ G.T

    b, K = _brute(model, opt.optimizers[0], opt.optimizers[1], pool, target, sel.covered, rho, block)
    assert _rel(sel.alignment, b) < 1e-6
    assert _rel(sel.gram, K[sel.filtered][:, sel.filtered]) < (1e-6 if gram == "exact" else 1.0)
    if gram == "exact":  # ρ, τ from the AdamW groups' β1 as in the other variants
        assert sel.diagnostics["curvature"] == pytest.approx((1 - 0.9) / (1 - 0.9 ** (steps + 1)))


def test_muon_model_errors_name_the_key():
    with pytest.raises(ValueError, match="muon_model"):
        FTWConfig(budget=2, muon_model="lowrank")  # geometry adam
    with pytest.raises(ValueError, match="muon_model"):
        FTWConfig(budget=2, geometry="auto", muon_model="opus")
    model = tiny_llama()
    with pytest.raises(ValueError, match="muon_model"):
        FilterThenWeight(
            model, torch.optim.AdamW(model.parameters()), FTWConfig(budget=2, geometry="auto", muon_model="adam")
        )
    with pytest.raises(ValueError, match="muon_model"):
        FilterThenWeight(
            model,
            [torch.optim.Muon([p for p in model.parameters() if p.ndim == 2])],
            FTWConfig(budget=2, geometry="muon", muon_model="adam"),
        )


def test_less_under_muon_is_adam_P_on_adamw_layers_and_identity_on_muon():
    from optsel.selection.base import get_selector_factory

    model = tiny_llama()
    muon, adamw = opts = _hybrid(model)
    _train(model, opts, 2)
    pool, target = make_batch(8, 9, seed=71), make_batch(3, 7, seed=72)
    less = get_selector_factory("less")(model=model, optimizer=opts, budget=3)
    sel = less.select(pool, target)
    b, _ = _brute(model, muon, adamw, pool, target, sel.covered, 0.0, lambda p, G, gv: (G @ gv, G @ G.T))
    assert _rel(sel.alignment, b) < 1e-6


def test_quality_runner_muon_schedule_scales_each_group():
    from benchmarks.quality_runs import _optimizer, _train_on
    from optsel.pipeline.engines.shared import OptimizerConfig, lr_factor

    model = tiny_llama()
    opt = OptimizerConfig(name="muon", lr=1e-3, muon_lr=0.02, warmup_steps=2, schedule="cosine")
    optimizer = _optimizer(model, opt)
    assert type(optimizer).__name__ == "MuonAdamW"
    batch = make_batch(4, 8, seed=81)
    _train_on(model, optimizer, batch, torch.full((4,), 0.25, dtype=torch.float64), opt, 1, 10)
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    f = lr_factor(1, opt, 10)
    assert lrs == sorted({round(1e-3 * f, 12), round(0.02 * f, 12)})


def test_quality_section_muon_quick(tmp_path):
    """The Muon grid's machinery on the quick settings: every variant runs under Muon + AdamW and its
    muon_model reaches the selector (the exact and lowrank models count the first step's degenerate
    fallback; the adam and identity models read the Muon matrices as Adam / P = I layers and do not)."""
    import json

    from benchmarks import quality

    quality.main(["--quick", "--section", "muon", "--variants", "all", "--workers", "1", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["settings"]["optimizer"]["name"] == "muon" and "section muon" in summary["meta"]["mode"]
    labels = {r["method"] for r in summary["runs"]}
    assert labels == {
        "random",
        "oracle",
        "ftw_muon",
        "ftw_muon_adam",
        "ftw_muon_identity",
        "ftw_muon_lowrank",
        "greats",
        "less",
        "full",
    }
    for r in summary["runs"]:
        degenerate = r["fallbacks"].get("muon_degenerate", 0)
        if r["method"] in ("ftw_muon", "ftw_muon_lowrank"):
            assert degenerate > 0, r["method"]
        else:
            assert degenerate == 0, r["method"]
    with pytest.raises(ValueError, match="seed_blocks"):
        quality.seed_blocks(
            {"seed_blocks": [[0], [0, 1]]}, quality.load_grid(quality.GRID_FILE, True, "muon")["settings_obj"]
        )


def test_speed_muon_rows_quick(tmp_path):
    """The Muon step-cost rows: the counted FLOPs hold the NS JVP's formula count (share ≤ 1), FTW's exact
    Muon step costs more than the lowrank and identity controls, and the table is written."""
    from benchmarks import speed

    out = speed.main(["--quick", "--muon-only", "--repeats", "1", "--out", str(tmp_path)])
    rows = out["muon"]["small"]["rows"]
    exact = rows["muon ftw[auto] (NS Jacobian)"]
    assert 0.3 < exact["ns_jvp_share"] <= 1.0
    assert exact["flops"] > rows["muon ftw[lowrank S]"]["flops"] > rows["muon ftw[identity]"]["flops"]
    assert rows["muon random (the reference)"]["flop_ratio"] == 1.0
    assert "| muon ftw[auto] (NS Jacobian) |" in (tmp_path / "speed_muon.md").read_text()
