"""FTW's Muon geometry (docs/design.md#muon-geometry) against brute force, float64, on a hybrid Muon + AdamW tiny Llama.

The explicit computation: per-sample gradients from torch.func (helpers_bruteforce.per_sample_grads), and for
every Muon matrix the Jacobian (torch.func.jacfwd: its in-place NS has no reverse mode) of one real torch.optim.Muon update — the functional
``torch.optim._muon.muon`` that ``Muon.step`` calls, with the group's own hyper-parameters and a clone of its
momentum buffer — with respect to the gradient, at gradient 0. Muon's bfloat16 cast inside Newton–Schulz is
lifted for the exact comparison (``_exact_ns``); ``test_bf16_update_close`` checks the real bf16 update.
"""

from __future__ import annotations

import pytest
import torch

from optsel.selection import FilterThenWeight, FTWConfig
from optsel.selection import muon_geometry as mg

from support.bruteforce import make_batch, per_sample_grads, tiny_gpt2, tiny_llama
from support.muon import ADAM_LR, _brute, _exact_ns, _hybrid, _real_update, _rel, _train


@pytest.mark.parametrize(
    "nesterov,exchange,adjust",
    [
        (True, "direction", None),
        (False, "factors", None),
        (True, "factors", "match_rms_adamw"),
        (False, "direction", "original"),
    ],
)
def test_b_and_K_against_real_muon_jacobian(nesterov, exchange, adjust):
    model = tiny_llama()
    opts = _hybrid(model, nesterov=nesterov, adjust_lr_fn=adjust)
    _train(model, opts, 3)
    pool, target = make_batch(8, 9, seed=11), make_batch(3, 7, seed=12)
    cfg = FTWConfig(budget=3, filter_size=6, geometry="auto", exchange=exchange)
    sel = FilterThenWeight(model, opts, cfg).select(pool, target)
    assert set(sel.diagnostics["gram_backends"].values()) >= {"muon"}
    assert sel.diagnostics["fallbacks"].get("muon_degenerate") is None
    rho, tau = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    b, K = _brute(model, opts, pool, target, sel.covered, rho, tau)
    f = sel.filtered
    assert _rel(sel.alignment, b) < 1e-6
    assert _rel(sel.gram, K[f][:, f]) < 1e-6
    u = b - 0.5 * (tau / cfg.budget) * K.diagonal()
    assert _rel(sel.utility, u) < 1e-6


def test_geometry_muon_identity_on_adam_layers_and_conv1d():
    """geometry: muon — Muon layers as above, the AdamW layers (lm_head) P = I; GPT-2's Conv1D Muon
    weights are stored [d_in, d_out] (NS acts on the stored matrix)."""
    model = tiny_gpt2()
    opts = _hybrid(model, nesterov=True)
    _train(model, opts, 2)
    pool, target = make_batch(6, 9, seed=21), make_batch(3, 7, seed=22)
    sel = FilterThenWeight(model, opts, FTWConfig(budget=2, filter_size=4, geometry="muon")).select(pool, target)
    rho, tau = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    b, K = _brute(model, opts, pool, target, sel.covered, rho, tau, geometry="muon")
    assert _rel(sel.alignment, b) < 1e-6
    assert _rel(sel.gram, K[sel.filtered][:, sel.filtered]) < 1e-6
    assert sel.diagnostics["preconditioner"].startswith("muon")


def test_before_first_step_falls_back_to_identity_counted():
    """No momentum buffer yet: every Muon layer is P = I (b = ⟨g_i, g_V⟩), counted as muon_degenerate."""
    model = tiny_llama()
    opts = _hybrid(model)
    pool, target = make_batch(6, 9, seed=31), make_batch(3, 7, seed=32)
    sel = FilterThenWeight(model, opts, FTWConfig(budget=2, filter_size=4, geometry="auto")).select(pool, target)
    n_muon = sum(be == "muon" for be in sel.diagnostics["gram_backends"].values())
    assert n_muon > 0 and sel.diagnostics["fallbacks"]["muon_degenerate"] == n_muon
    names = sel.covered
    gp, gt = per_sample_grads(model, pool, names), per_sample_grads(model, target, names)
    b = sum(
        torch.stack([g[k] for g in gp]).reshape(len(gp), -1) @ (sum(g[k] for g in gt) / 3).reshape(-1) for k in names
    )
    assert _rel(sel.alignment, b) < 1e-6


def test_newton_schulz_matches_torch():
    gen = torch.Generator().manual_seed(0)
    import torch.optim._muon as muon_mod

    for shape in ((5, 9), (9, 5)):
        X = torch.randn(*shape, generator=gen, dtype=torch.float64)
        ours = mg.newton_schulz(X, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        with _exact_ns():
            exact = muon_mod._zeropower_via_newtonschulz(X, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        real = muon_mod._zeropower_via_newtonschulz(X, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert _rel(ours, exact) < 1e-12
        assert _rel(ours, real.double()) < 0.05  # the optimizer's own bf16 rounding on top


def test_bf16_update_close():
    """The geometry's zero-gradient update u₀ against the real (bf16) Muon step: equal to bf16 rounding."""
    model = tiny_llama()
    opts = _hybrid(model)
    _train(model, opts, 2)
    layer = next(
        lay
        for lay in FilterThenWeight(model, opts, FTWConfig(budget=2, geometry="auto")).coverage.layers
        if "q_proj" in lay.name
    )
    muon = opts[0]
    group = muon.param_groups[0]
    geo = mg.muon_layer_geometry(muon, group, layer, torch.float64, ADAM_LR, 1.0)
    real = _real_update(muon, layer.param)(torch.zeros_like(layer.param))
    assert _rel(geo.u0, real) < 0.05


def test_config_errors_name_the_key():
    model = tiny_llama()
    opts = _hybrid(model)
    with pytest.raises(ValueError, match="exchange"):
        FilterThenWeight(model, opts, FTWConfig(budget=2, geometry="auto", exchange="sketches", gram="sketch"))
    with pytest.raises(ValueError, match="gram"):
        FilterThenWeight(model, opts, FTWConfig(budget=2, geometry="muon", gram="ghost"))
    with pytest.raises(ValueError, match="direction_cache"):
        FilterThenWeight(model, opts, FTWConfig(budget=2, geometry="muon", direction_cache=True))
    adam_only = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="geometry"):
        FilterThenWeight(model, adam_only, FTWConfig(budget=2, geometry="muon"))
    with pytest.raises(ValueError, match="geometry"):
        FTWConfig(budget=2, geometry="shampoo")
    # geometry auto on a plain AdamW run is the Adam geometry
    sel_auto = FilterThenWeight(model, adam_only, FTWConfig(budget=2, geometry="auto"))
    assert not sel_auto.muon_layers


def test_batched_jvp_matches_torch_func():
    """The written-out J_NS(X)[dX] equals torch.func.jvp of newton_schulz, wide and tall, float64."""
    gen = torch.Generator().manual_seed(1)
    coeffs = (3.4445, -4.7750, 2.0315)
    for shape in ((5, 9), (9, 5)):
        X = torch.randn(*shape, generator=gen, dtype=torch.float64)
        dX = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
        ours = mg.newton_schulz_jvp(X, dX, coeffs, 5, 1e-7)
        ref = torch.stack([torch.func.jvp(lambda x: mg.newton_schulz(x, coeffs, 5, 1e-7), (X,), (d,))[1] for d in dX])
        assert _rel(ours, ref) < 1e-12
