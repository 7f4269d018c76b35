"""Baseline selectors: contract (k distinct indices, weights sum to 1), each against a direct or
brute-force computation, config validation, UDS state round trip, FTW ablations."""

from __future__ import annotations

import pytest
import torch

from optsel.losses import per_sample_token_mean_ce
from optsel.selection.base import get_selector_factory
from optsel.selection.baselines.greats import GreatsConfig, greedy_gain
from optsel.selection.baselines.scores import ScoreConfig
from optsel.selection.baselines.uds import UDSConfig
from optsel.selection.capture import find_covered_layers
from optsel.selection.ftw import FTWConfig

from support.bruteforce import brute_force, make_batch, per_sample_grads, tiny_llama, train_steps, trained_llama

K = 4
NAMES = ["loss", "gradnorm", "greats", "uds", "less", "ftw_sgd", "ftw_filter_only", "ftw_weight_only"]


@pytest.fixture(scope="module")
def trained():
    return trained_llama(seed=5, steps=3, pool_size=12, betas=(0.9, 0.99))


def build(name, model, opt, budget=K, **options):
    factory = get_selector_factory(name)
    config = factory.config_class(budget=budget, **options) if options else None
    return factory(model=model, optimizer=opt, budget=budget, seed=0, config=config)


@pytest.mark.parametrize("name", NAMES)
def test_selects_k_distinct_with_unit_weights(trained, name):
    model, opt, pool, target = trained
    sel = build(name, model, opt).select(pool, target)
    assert sel.indices.numel() == K and sel.indices.unique().numel() == K
    assert int(sel.indices.min()) >= 0 and int(sel.indices.max()) < 12 and sel.pool_size == 12
    assert sel.weights.dtype == torch.float64 and (sel.weights >= 0).all()
    assert abs(float(sel.weights.sum()) - 1.0) < 1e-9
    assert torch.equal(sel.local_indices, sel.indices)  # one process: everything is local


@torch.no_grad()
def direct_losses(model, pool):
    out = []
    for i in range(pool["input_ids"].shape[0]):
        n = int(pool["attention_mask"][i].sum())
        logits = model(input_ids=pool["input_ids"][i : i + 1, :n]).logits
        out.append(float(per_sample_token_mean_ce(logits, pool["labels"][i : i + 1, :n]).loss))
    return torch.tensor(out, dtype=torch.float64)


def test_loss_picks_highest_loss(trained):
    model, opt, pool, _ = trained
    sel = build("loss", model, opt, chunk_size=5).select(pool)
    losses = direct_losses(model, pool)
    assert torch.allclose(sel.utility, losses, atol=1e-9)
    assert set(sel.indices.tolist()) == set(losses.topk(K).indices.tolist())
    assert torch.allclose(sel.weights, torch.full((K,), 1.0 / K, dtype=torch.float64))


def test_gradnorm_matches_per_sample_grads(trained):
    model, opt, pool, _ = trained
    sel = build("gradnorm", model, opt).select(pool)
    names = find_covered_layers(model).names
    grads = per_sample_grads(model, pool, names)
    norms = torch.tensor([sum(float(g[k].square().sum()) for k in names) for g in grads], dtype=torch.float64)
    assert torch.allclose(sel.utility, norms, rtol=1e-8, atol=1e-12)
    assert set(sel.indices.tolist()) == set(norms.topk(K).indices.tolist())


def naive_greedy(G: torch.Tensor, gv: torch.Tensor, k: int, lr: float) -> list[int]:
    """GREATS greedy on explicit gradients G [N, P], gv [P]: re-evaluates every marginal gain."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_gain = -1, -float("inf")
        for i in range(G.shape[0]):
            if i in chosen:
                continue
            gain = lr * float(G[i] @ gv) - lr * lr * sum(float(G[i] @ G[j]) for j in chosen)
            if gain > best_gain:
                best, best_gain = i, gain
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("gram", ["exact", "ghost"])
def test_greats_matches_brute_force_greedy(trained, gram):
    model, opt, pool, target = trained
    lr = 30.0  # large enough that the second-order term changes the choice
    sel = build("greats", model, opt, lr=lr, gram=gram).select(pool, target)
    names = sel.covered
    gp, gt = per_sample_grads(model, pool, names), per_sample_grads(model, target, names)
    G = torch.stack([torch.cat([g[n].reshape(-1) for n in names]) for g in gp])
    gv = torch.stack([torch.cat([g[n].reshape(-1) for n in names]) for g in gt]).mean(0)
    b, Kmat, _ = brute_force(model, opt, pool, target, names, 0.0, 1.0, geometry="sgd")
    assert torch.allclose(sel.alignment, b, rtol=1e-7, atol=1e-10)
    expected = naive_greedy(G, gv, K, lr)
    assert set(sel.indices.tolist()) == set(expected)
    order, _ = greedy_gain(b, Kmat, K, lr)
    assert order.tolist() == expected


def test_greats_lr_defaults_to_optimizer(trained):
    model, opt, pool, target = trained
    sel = build("greats", model, opt).select(pool, target)
    assert sel.diagnostics["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="^target: "):
        build("greats", model, opt).select(pool, None)


def test_uds_state_round_trip_reproduces_next_selection(trained):
    model, opt, pool, _ = trained
    pools = [make_batch(12, 9, seed=50 + s) for s in range(3)]
    a = build("uds", model, opt, alpha=5.0, buffer_size=6)
    for p in pools[:2]:
        a.select(p)
    assert a.buffer.shape[0] == 6 and a.pointer == (2 * K) % 6  # FIFO wrapped
    state = a.state_dict()
    b = build("uds", model, opt, alpha=5.0, buffer_size=6)
    b.load_state_dict(state)
    sa, sb = a.select(pools[2]), b.select(pools[2])
    assert torch.equal(sa.indices, sb.indices) and torch.allclose(sa.utility, sb.utility)
    fresh = build("uds", model, opt, alpha=5.0, buffer_size=6).select(pools[2])
    assert not torch.allclose(fresh.utility, sa.utility)  # the buffer matters


def test_uds_scores_nuclear_norm_first_step(trained):
    model, opt, pool, _ = trained
    sel = build("uds", model, opt).select(pool)  # empty buffer: score = nuclear norm
    with torch.no_grad():
        logits = model(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"]).logits.float()
    logits = logits * pool["attention_mask"].unsqueeze(-1)
    nuclear = torch.linalg.svdvals(logits).sum(-1).double()
    assert torch.allclose(sel.utility, nuclear, rtol=1e-5)
    with pytest.raises(ValueError, match="^max_seq_len: "):
        build("uds", model, opt, max_seq_len=4).select(pool)


def test_less_is_ftw_alignment_without_momentum(trained):
    model, opt, pool, target = trained
    sel = build("less", model, opt).select(pool, target)
    b, _, _ = brute_force(model, opt, pool, target, sel.covered, 0.0, 1.0)
    assert torch.allclose(sel.alignment, b, rtol=1e-6, atol=1e-9 * float(b.abs().max()))
    assert set(sel.indices.tolist()) == set(b.topk(K).indices.tolist())


def test_ftw_ablations(trained):
    model, opt, pool, target = trained
    sgd = build("ftw_sgd", model, opt)
    assert sgd.config.geometry == "sgd" and sgd.name == "ftw_sgd"
    assert sgd.select(pool, target).diagnostics["preconditioner"].startswith("identity")
    fo = build("ftw_filter_only", model, opt).select(pool, target)
    top = torch.sort(fo.utility, descending=True, stable=True).indices[:K]
    assert set(fo.indices.tolist()) == set(top.tolist())
    assert torch.allclose(fo.weights, torch.full((K,), 1.0 / K, dtype=torch.float64))
    wo = build("ftw_weight_only", model, opt)
    assert wo.config.filter_ratio == 1.0 and wo.select(pool, target).filtered.numel() == int(
        (wo.select(pool, target).utility > 0).sum().clamp(min=K)
    )


@pytest.mark.parametrize(
    "name,options,field",
    [
        ("ftw_sgd", dict(geometry="adam"), "geometry"),
        ("ftw_filter_only", dict(filter_size=8), "filter_size"),
        ("ftw_weight_only", dict(filter_ratio=0.5), "filter_ratio"),
        ("ftw_sketch_exchange", dict(gram="exact"), "exchange"),
        ("ftw_sketch_exchange", dict(exchange="factors"), "exchange"),
    ],
)
def test_ablation_rejects_conflicting_options(name, options, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        get_selector_factory(name).config_class(budget=K, **options)


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (ScoreConfig, dict(budget=0), "budget"),
        (ScoreConfig, dict(budget=2, chunk_size=0), "chunk_size"),
        (GreatsConfig, dict(budget=2, lr=0.0), "lr"),
        (GreatsConfig, dict(budget=2, gram="sketch"), "gram"),
        (UDSConfig, dict(budget=2, alpha=-1.0), "alpha"),
        (UDSConfig, dict(budget=2, buffer_size=0), "buffer_size"),
    ],
)
def test_config_validation(cls, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        cls(**kwargs)


def test_budget_mismatch_is_an_error(trained):
    model, opt, _, _ = trained
    for name in ("loss", "greats", "uds", "less", "ftw_sgd"):
        factory = get_selector_factory(name)
        with pytest.raises(ValueError, match="budget"):
            factory(model=model, optimizer=opt, budget=3, seed=0, config=factory.config_class(budget=2))
    assert isinstance(get_selector_factory("ftw_sgd").config_class(budget=2), FTWConfig)


DIST_NAMES = ["loss", "gradnorm", "greats", "uds", "less"]


def _dist_body(rank: int, world_size: int) -> dict[str, list[int]]:
    model = tiny_llama(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    train_steps(model, opt, 3)
    pool, target = make_batch(12, 9, seed=41), make_batch(4, 8, seed=42)
    half = lambda b, r: {k: v[r * 6 : (r + 1) * 6] for k, v in b.items()}  # noqa: E731
    th = lambda b, r: {k: v[r * 2 : (r + 1) * 2] for k, v in b.items()}  # noqa: E731
    out = {}
    for name in DIST_NAMES:
        sel = build(name, model, opt).select(half(pool, rank), th(target, rank))
        out[name] = sel.indices.tolist()
        out[name + "/local"] = (sel.local_indices + 6 * rank).tolist()
    return out


def test_two_ranks_select_what_one_process_selects(trained):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from support.dist import run_distributed

    model, opt, pool, target = trained
    results = run_distributed(_dist_body, world_size=2)
    for name in DIST_NAMES:
        single = build(name, model, opt).select(pool, target).indices.tolist()
        assert results[0][name] == results[1][name] == single, name
        assert sorted(results[0][name + "/local"] + results[1][name + "/local"]) == single
