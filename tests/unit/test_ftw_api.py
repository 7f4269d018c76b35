"""The public API of docs/design.md#selection-api: FTWConfig validation, registry factory, Selection contents,
consistency with brute force, fallbacks, target refresh and state_dict round trips."""

from __future__ import annotations

import pytest
import torch

from optsel.selection import FilterThenWeight, FTWConfig, Selection
from optsel.selection.base import get_selector_factory
from optsel.selection.solvers import cvxpy_qp, objective

from support.bruteforce import brute_force, make_batch, tiny_llama, train_steps, trained_llama

PHASES = {"capture", "target", "gather", "alignment", "gram", "filter", "solve"}


@pytest.fixture(scope="module")
def trained():
    return trained_llama(seed=3, steps=4, pool_size=10, betas=(0.9, 0.99), batch_seed=31)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(budget=0), "budget"),
        (dict(budget=4, filter_size=2), "filter_size"),
        (dict(budget=2, filter_ratio=0.0), "filter_ratio"),
        (dict(budget=2, gram="dense"), "gram"),
        (dict(budget=2, geometry="adamw"), "geometry"),
        (dict(budget=2, curvature=-1.0), "curvature"),
        (dict(budget=2, momentum_coef=-0.1), "momentum_coef"),
        (dict(budget=4, w_max=0.1), "w_max"),
        (dict(budget=2, target_refresh=0), "target_refresh"),
        (dict(budget=2, sketch_dim_in=0), "sketch_dim_in"),
        (dict(budget=2, solver="scs"), "solver"),
        (dict(budget=2, support="all"), "support"),
        (dict(budget=2, capture_chunk_tokens=0), "capture_chunk_tokens"),
        (dict(budget=2, capture_chunk_size=2, capture_chunk_tokens=64), "capture_chunk_tokens"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        FTWConfig(**kwargs)
    with pytest.raises(TypeError):
        FTWConfig(2)  # kw_only


def test_registry_factory(trained):
    model, opt, pool, target = trained
    factory = get_selector_factory("ftw")
    assert factory.config_class is FTWConfig
    sel = factory(model=model, optimizer=opt, config=FTWConfig(budget=3, gram="exact"), budget=3, seed=0)
    assert isinstance(sel, FilterThenWeight) and sel.needs_target and sel.name == "ftw"
    assert factory(model=model, optimizer=opt, budget=2, seed=1).config.budget == 2
    with pytest.raises(ValueError, match="budget"):
        factory(model=model, optimizer=opt, config=FTWConfig(budget=3), budget=4, seed=0)


@pytest.mark.parametrize("support", ["topk", "greedy"])
def test_selection_is_consistent_with_brute_force(trained, support):
    model, opt, pool, target = trained
    cfg = FTWConfig(budget=3, filter_size=6, gram="exact", support=support, curvature=0.02)
    sel = FilterThenWeight(model, opt, cfg).select(pool, target)
    assert isinstance(sel, Selection) and sel.pool_size == 10
    b, K, u = brute_force(
        model,
        opt,
        pool,
        target,
        sel.covered,
        sel.diagnostics["momentum_coef"],
        0.02,
        batch_share=cfg.budget if cfg.filter_curvature == "batch" else None,
    )
    assert sel.alignment.shape == (10,) and sel.utility.shape == (10,)
    f = sel.filtered
    m = f.numel()
    assert sel.gram.shape == (m, m) and m == sel.diagnostics["num_filtered"]
    assert torch.allclose(sel.gram, K[f][:, f], rtol=1e-6, atol=1e-12)
    assert (sel.utility[f][:-1] >= sel.utility[f][1:]).all()  # gram order = decreasing utility
    if "filter_underflow" not in sel.diagnostics["fallbacks"]:
        assert (u[f] > 0).all() and m == min(6, int((u > 0).sum()))
    # indices ⊂ filtered, ≤ k, weights the QP optimum on their support
    assert 1 <= sel.indices.numel() <= 3 and set(sel.indices.tolist()) <= set(f.tolist())
    assert (sel.weights > 0).all() and sel.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    s = sel.indices
    ref = cvxpy_qp(b[s], K[s][:, s], 0.02).w
    mine = float(objective(sel.weights, b[s], K[s][:, s], 0.02))
    assert mine >= float(objective(ref, b[s], K[s][:, s], 0.02)) - 1e-6 * abs(mine)
    assert all(p.grad is None for p in model.parameters())  # selection leaves .grad alone
    assert torch.equal(sel.local_indices, sel.indices) and torch.equal(sel.local_weights, sel.weights)
    assert PHASES <= set(sel.timings) and all(t >= 0 for t in sel.timings.values())
    d = sel.diagnostics
    for key in ("fallbacks", "solver_status", "preconditioner", "gram_condition", "num_filtered", "comm_bytes"):
        assert key in d
    assert d["solver_status"] == "optimal" and d["comm_bytes"] == 0 and d["gram_condition"] >= 1.0
    assert sel.covered == [n for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight"]


def test_filter_underflow_and_nonfinite_fallbacks(trained):
    model, opt, pool, target = trained
    huge = FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=6, gram="exact", curvature=1e6))
    sel = huge.select(pool, target)
    assert sel.diagnostics["fallbacks"] == {"filter_underflow": 1}
    assert sel.filtered.tolist() == sel.utility.argsort(descending=True)[:3].tolist()

    broken = tiny_llama(seed=3)
    opt2 = torch.optim.AdamW(broken.parameters(), lr=1e-2)
    train_steps(broken, opt2, 1)
    p = broken.model.layers[0].self_attn.q_proj.weight
    opt2.state[p]["exp_avg_sq"][0, 0] = float("nan")
    ftw = FilterThenWeight(broken, opt2, FTWConfig(budget=3, filter_size=6, gram="exact"))
    sel = ftw.select(pool, target)
    assert sel.diagnostics["fallbacks"]["nonfinite_gram"] == 1 and sel.diagnostics["solver_status"] == "fallback"
    assert sel.indices.numel() == 3 and torch.allclose(sel.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    ftw.select(pool, target)
    assert ftw.state_dict()["counters"]["nonfinite_gram"] == 2


def test_target_refresh_and_state_dict_round_trip(trained):
    model, opt, pool, target = trained
    cfg = FTWConfig(budget=3, filter_size=6, gram="sketch", sketch_dim_out=4, sketch_dim_in=4, target_refresh=2)
    a = FilterThenWeight(model, opt, cfg, seed=7)
    first = a.select(pool, target)
    assert first.diagnostics["target_refreshed"]
    state = a.state_dict()
    second = a.select(pool, None)  # the cached g_V is used: no target needed
    assert not second.diagnostics["target_refreshed"]
    with pytest.raises(ValueError, match="target"):
        a.select(pool, None)

    b = FilterThenWeight(model, opt, cfg, seed=123)
    b.load_state_dict(state)
    resumed = b.select(pool, None)
    assert torch.equal(resumed.gram, second.gram) and torch.equal(resumed.indices, second.indices)
    assert not torch.equal(second.gram, first.gram)  # fresh sketch projections each step
    fresh = FilterThenWeight(model, opt, cfg, seed=123).select(pool, target)
    assert not torch.equal(fresh.gram, first.gram)


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, opt, pool, target = _dp_setup()
        local = {k: v[rank * 4 : (rank + 1) * 4] for k, v in pool.items()}
        width = int(local["attention_mask"].sum(1).max())  # ranks see different T
        local = {k: v[:, :width] for k, v in local.items()}
        tgt = {k: v[rank * 2 : (rank + 1) * 2] for k, v in target.items()}
        res = {}
        for gram in ("exact", "sketch"):
            s = FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=6, gram=gram)).select(local, tgt)
            res[gram] = (s.indices, s.weights, s.alignment, s.gram, s.local_indices, s.diagnostics["comm_bytes"])
        torch.save(res, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _dp_setup():
    model = tiny_llama(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2)
    return model, opt, make_batch(8, 9, seed=31), make_batch(4, 8, seed=32)


@pytest.mark.distributed
def test_two_ranks_select_what_one_rank_selects(tmp_path):
    import torch.multiprocessing as mp

    from optsel.distributed import free_port

    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    model, opt, pool, target = _dp_setup()
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for gram in ("exact", "sketch"):
        one = FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=6, gram=gram)).select(pool, target)
        for r, res in enumerate(ranks):
            indices, weights, alignment, K, local_idx, comm = res[gram]
            assert torch.equal(indices, one.indices)
            torch.testing.assert_close(weights, one.weights, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(alignment, one.alignment, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(K, one.gram, rtol=1e-9, atol=1e-12)
            mine = one.indices[(one.indices >= 4 * r) & (one.indices < 4 * r + 4)] - 4 * r
            assert torch.equal(local_idx, mine) and comm > 0


def test_capture_chunk_tokens_bounds_tokens_per_pass_and_selects_the_same(trained):
    """capture_chunk_tokens t: passes of length-sorted rows, each cut to its longest row and holding at most t
    token positions (a row longer than t alone), and the selection equals the unchunked one (the capture is per
    sample) — single pass, joint target."""
    model, opt, pool, target = trained
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        chunked = FilterThenWeight(model, opt, FTWConfig(budget=3, gram="exact", capture_chunk_tokens=27)).select(
            pool, target
        )
    finally:
        handle.remove()
    whole = FilterThenWeight(model, opt, FTWConfig(budget=3, gram="exact")).select(pool, target)
    n = pool["input_ids"].shape[0] + target["input_ids"].shape[0]
    assert sum(rows for rows, _ in calls) == n, calls  # every pool and target row in exactly one pass
    assert all(rows * width <= 27 or rows == 1 for rows, width in calls), calls
    widths = [width for _, width in calls]
    assert widths == sorted(widths, reverse=True), calls  # longest rows first, each pass cut to its own
    assert torch.equal(chunked.indices, whole.indices)
    torch.testing.assert_close(chunked.alignment, whole.alignment, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.weights, whole.weights, rtol=1e-6, atol=1e-9)
