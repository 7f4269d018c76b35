"""Two-stage FTW (prefilter: head, docs/design.md#two-stage) against brute force on tiny float64 models:
stage 1 is the output layer's exact per-sample alignment under Adam's P (tied head included), stage 2
is exact FTW on the survivors, the single pass trains on the chosen rows in pool numbering."""

from __future__ import annotations

import copy

import pytest
import torch

from optsel.selection.base import Selection
from optsel.selection.ftw import FilterThenWeight, FTWConfig
from optsel.selection.ftw.prefilter import scoring_window
from optsel.selection.ftw.two_stage import Stage1, SurvivorPool

from support.bruteforce import adam_precond, make_batch, per_sample_grads, tiny_llama, train_steps
from support.common import REPO

N, K, M = 10, 3, 6


def _trained(tie: bool = False):
    model = tiny_llama(tie=tie).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    return model, opt


def _head_bruteforce(model, opt, pool, target, rho, tau, k, with_gram: bool = False, depth: int | None = None):
    """(b, u) (and K with ``with_gram``) of the output layer's use of its weight, from torch.func per-sample gradients of an untied
    copy (so a tied weight's embedding use is left out) with the tied parameter's own P, m̂. ``depth``: the copy
    keeps only its first ``depth`` decoder blocks (a model built that shallow, with the same weights)."""
    untied = copy.deepcopy(model)
    if depth is not None:
        untied.model.layers = torch.nn.ModuleList(list(untied.model.layers)[:depth])
        untied.config.num_hidden_layers = depth
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    P, mhat = adam_precond(opt, model.lm_head.weight)
    gp = per_sample_grads(untied, pool, ["lm_head.weight"])
    gt = per_sample_grads(untied, target, ["lm_head.weight"])
    G = torch.stack([g["lm_head.weight"] for g in gp]).reshape(len(gp), -1)
    gv = sum(g["lm_head.weight"] for g in gt) / len(gt)
    b = G @ (P * (gv - rho * mhat)).reshape(-1)
    K = (G * P.reshape(-1)) @ G.T
    u = b - 0.5 * (tau / k) * K.diagonal()
    return (b, u, K) if with_gram else (b, u)


@pytest.mark.parametrize("tie", [False, True])
def test_stage1_is_the_output_layers_exact_preconditioned_alignment(tie):
    model, opt = _trained(tie)
    pool, target = make_batch(N, 9, 1), make_batch(4, 9, 2)
    ftw = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact"))
    sel = ftw.select(pool, target)
    rho, tau = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    b, u = _head_bruteforce(model, opt, pool, target, rho, tau, K)
    torch.testing.assert_close(sel.alignment, b, rtol=1e-9, atol=1e-10 * float(b.abs().max()))
    torch.testing.assert_close(sel.utility, u, rtol=1e-9, atol=1e-10 * float(u.abs().max()))
    survivors = torch.sort(u, descending=True, stable=True).indices[:M]
    assert set(sel.filtered.tolist()) <= set(survivors.tolist())
    assert set(sel.indices.tolist()) <= set(survivors.tolist()) and 1 <= sel.indices.numel() <= K
    assert sel.diagnostics["stage1_survivors"] == M and "stage1" in sel.timings
    if not tie:  # the untied head is a covered layer: 'reuse' takes its stage-2 target block one step later
        reuse = FilterThenWeight(
            model, opt, FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact", prefilter_target="reuse")
        )
        first, second = reuse.select(pool, target), reuse.select(pool, target)
        assert not first.diagnostics["stage1_target_reused"] and second.diagnostics["stage1_target_reused"]
        torch.testing.assert_close(second.alignment, b, rtol=1e-9, atol=1e-10 * float(b.abs().max()))


def test_stage2_is_exact_ftw_on_the_survivors_and_the_single_pass_trains_the_chosen_rows():
    model, opt = _trained()
    pool, target = make_batch(N, 9, 3), make_batch(4, 9, 4)
    two = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact"))
    sel = two.select(pool, target)
    rows = torch.sort(sel.utility, descending=True, stable=True).indices[:M].sort().values
    sub = {key: v[rows] for key, v in pool.items()}
    exact = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=M, gram="exact")).select(sub, target)
    assert torch.equal(sel.indices, rows[exact.indices])
    torch.testing.assert_close(sel.weights, exact.weights)
    torch.testing.assert_close(sel.gram, exact.gram)
    assert torch.equal(sel.local_indices, sel.indices)  # one process: local = global
    # the single pass: Σ w_i ∇ℓ_i over every parameter, pool rows in, from the survivors' pass
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = per_sample_grads(model, pool, names)
    opt.zero_grad(set_to_none=True)
    sel.pool_pass.accumulate_into_grads(sel.local_indices, sel.local_weights)
    params = dict(model.named_parameters())
    for name in names:
        want = sum(float(w) * grads[int(i)][name] for i, w in zip(sel.indices, sel.weights))
        torch.testing.assert_close(params[name].grad, want, rtol=1e-7, atol=1e-9, msg=name)
    outside = [r for r in range(N) if r not in rows.tolist()][0]
    with pytest.raises(ValueError, match="not in this pass"):
        sel.pool_pass.local_grads(torch.tensor([outside]), torch.tensor([0.5], dtype=torch.float64))
    sel.pool_pass.local_grads(torch.tensor([outside]), torch.tensor([0.0], dtype=torch.float64))  # keep-in-step row


@pytest.mark.parametrize("tie", [False, True])
def test_head_only_stage2_solves_the_qp_on_the_heads_exact_b_and_gram(tie):
    model, opt = _trained(tie)
    pool, target = make_batch(N, 9, 8), make_batch(4, 9, 9)
    sel = FilterThenWeight(
        model, opt, FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact", prefilter_stage2="head")
    ).select(pool, target)
    b, u, Kh = _head_bruteforce(
        model, opt, pool, target, sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"], K, with_gram=True
    )
    positive = [int(i) for i in torch.sort(u, descending=True, stable=True).indices if u[i] > 0][:M]
    assert sel.filtered.tolist() == (positive if len(positive) >= K else sel.filtered.tolist())
    f = sel.filtered
    torch.testing.assert_close(sel.gram, Kh[f][:, f], rtol=1e-9, atol=1e-10 * float(Kh.abs().max()))
    assert sel.pool_pass is None and sel.covered == ["lm_head.weight"]  # the trainer's own forward/backward
    assert set(sel.indices.tolist()) <= set(f.tolist()) and abs(float(sel.weights.sum()) - 1) < 1e-9


def test_survivor_pool_pads_uneven_ranks_with_label_free_rows_and_maps_back():
    pool = make_batch(6, 7, 5)
    survivors = torch.tensor([1, 4, 5, 7])  # rank 0 (rows 0-5): 1, 4, 5; rank 1 (rows 6-11): 7 → 1 + 2 padding
    sp = SurvivorPool.build(pool, survivors, [6, 6], rank=1)
    assert sp.sizes == [3, 3] and sp.global_of.tolist() == [1, 4, 5, 7, -1, -1]
    assert sp.local_rows.tolist() == [1] and sp.eligible.tolist() == [True] * 4 + [False] * 2
    assert torch.equal(sp.batch["input_ids"][0], pool["input_ids"][1])
    assert bool((sp.batch["labels"][1:] == -100).all()) and bool(sp.batch["attention_mask"][1:].any())
    assert sp.row_map(6).tolist() == [-1, 0, -1, -1, -1, -1]
    stage1 = Stage1(survivors, torch.zeros(12), torch.zeros(12), False)
    bad = Selection(
        indices=torch.tensor([4]),
        weights=torch.ones(1, dtype=torch.float64),
        local_indices=torch.tensor([1]),
        local_weights=torch.ones(1),
        pool_size=6,
    )
    with pytest.raises(RuntimeError, match="padding row was selected"):
        sp.remap(bad, [6, 6], stage1)


def test_scoring_window_keeps_w_tokens_from_a_quarter_window_before_the_first_label():
    ids = torch.arange(1, 13).repeat(3, 1)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[0, :8] = -100  # response starts at 8: window of 4 from 8 − 1 = 7
    labels[1, :1] = -100  # labels from 1: window from 0
    labels[2, :5] = -100  # 6 tokens long, response at 5: window clipped to [2, 6)
    labels[mask == 0] = -100
    out, pos = scoring_window({"input_ids": ids * mask, "attention_mask": mask, "labels": labels}, 4)
    assert pos.tolist() == [[7, 8, 9, 10], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert out["input_ids"].tolist() == [[8, 9, 10, 11], [1, 2, 3, 4], [3, 4, 5, 6]]
    assert out["labels"].tolist() == [[-100, 9, 10, 11], [-100, 2, 3, 4], [-100, -100, -100, 6]]
    same, none = scoring_window({"input_ids": ids, "attention_mask": mask, "labels": labels}, 12)
    assert none is None and torch.equal(same["input_ids"], ids)
    left = torch.ones(3, 12, dtype=torch.long)
    left[0, :2] = 0
    with pytest.raises(ValueError, match="right-padded"):
        scoring_window({"input_ids": ids, "attention_mask": left, "labels": labels}, 4)


def test_windowed_stage1_scores_the_windows_own_tokens_exactly():
    """With the window from position 0 (labels from token 1) stage 1 is the exact head alignment of
    the truncated samples."""
    model, opt = _trained()
    pool, target = make_batch(N, 9, 6, prompt=1), make_batch(4, 9, 7, prompt=1)
    W = 5
    ftw = FilterThenWeight(
        model, opt, FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact", prefilter_window=W)
    )
    sel = ftw.select(pool, target)
    cut = lambda b: {k: v[:, :W] for k, v in b.items()}  # noqa: E731
    b, u = _head_bruteforce(
        model, opt, cut(pool), cut(target), sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"], K
    )
    torch.testing.assert_close(sel.alignment, b, rtol=1e-9, atol=1e-10 * float(b.abs().max()))
    torch.testing.assert_close(sel.utility, u, rtol=1e-9, atol=1e-10 * float(u.abs().max()))


def _trained_deep(layers: int = 3):
    """A tiny float64 Llama like tiny_llama's but ``layers`` blocks deep, a few AdamW steps in."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    cfg.num_hidden_layers = layers
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).double().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    return model, opt


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_early_exit_stage1_is_the_head_alignment_of_the_first_blocks_alone(depth):
    """prefilter_depth L: stage 1 is the exact head alignment (Adam's P) of the model cut after L blocks
    (the final norm and head on h_L); every block is back afterwards (stage 2 and training see all)."""
    model, opt = _trained_deep(3)
    pool, target = make_batch(N, 9, 11), make_batch(4, 9, 12)
    cfg = FTWConfig(budget=K, filter_size=M, prefilter="head", gram="exact", prefilter_depth=depth)
    sel = FilterThenWeight(model, opt, cfg).select(pool, target)
    rho, tau = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    b, u = _head_bruteforce(model, opt, pool, target, rho, tau, K, depth=depth)
    torch.testing.assert_close(sel.alignment, b, rtol=1e-9, atol=1e-10 * float(b.abs().max()))
    torch.testing.assert_close(sel.utility, u, rtol=1e-9, atol=1e-10 * float(u.abs().max()))
    assert len(model.model.layers) == 3
    full, _ = _head_bruteforce(model, opt, pool, target, rho, tau, K)
    assert not torch.allclose(full, b)  # the early exit is a different (cheaper) score, not the full one
    rows = torch.sort(u, descending=True, stable=True).indices[:M].sort().values
    exact = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=M, gram="exact")).select(
        {key: v[rows] for key, v in pool.items()}, target
    )
    assert torch.equal(sel.indices, rows[exact.indices])  # stage 2: exact FTW over all 3 blocks


def test_prefilter_config_errors_name_the_key():
    from optsel.pipeline.train.run_config import ConfigError, load_run_config

    config = load_run_config(
        REPO / "configs/demo.yaml",
        ["selection.options.ftw.prefilter=head", "selection.options.ftw.prefilter_window=64"],
    )
    assert config.selection.options["ftw"]["prefilter"] == "head"
    with pytest.raises(ConfigError, match=r"selection.options.ftw.prefilter_window.*prefilter='head' only"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.prefilter_window=64"])
    with pytest.raises(ValueError, match="prefilter_window: must be >= 2"):
        FTWConfig(budget=2, prefilter="head", prefilter_window=1)
    with pytest.raises(ValueError, match="prefilter_target: 'reuse' takes the head block"):
        FTWConfig(budget=2, prefilter="head", prefilter_stage2="head", prefilter_target="reuse")
    with pytest.raises(ValueError, match="prefilter_target_rows: applies to prefilter='head' only"):
        FTWConfig(budget=2, prefilter_target_rows=4)
    with pytest.raises(ValueError, match="prefilter_target_rows: must be >= 1 with prefilter='head'"):
        FTWConfig(budget=2, prefilter="head", prefilter_target_rows=0)
    with pytest.raises(ValueError, match="prefilter_depth: applies to prefilter='head' only"):
        FTWConfig(budget=2, prefilter="learned", prefilter_depth=1)
    with pytest.raises(ValueError, match="prefilter_depth: must be >= 0"):
        FTWConfig(budget=2, prefilter="head", prefilter_depth=-1)
    with pytest.raises(ValueError, match="prefilter_target: 'reuse' takes the full model's head"):
        FTWConfig(budget=2, prefilter="head", prefilter_depth=1, prefilter_target="reuse")
    deep, deep_opt = _trained_deep(2)
    with pytest.raises(ValueError, match="prefilter_depth: 3 exceeds the model's 2 decoder blocks"):
        FilterThenWeight(deep, deep_opt, FTWConfig(budget=2, prefilter="head", prefilter_depth=3))
    with pytest.raises(ValueError, match="prefilter: 'head' runs stage 2 with the exact b"):
        FTWConfig(budget=2, prefilter="head", gram="sketch", exchange="sketches")
    model, opt = _trained()
    for p in model.lm_head.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="its weight is frozen"):
        FilterThenWeight(model, opt, FTWConfig(budget=2, prefilter="head"))
