"""The learned stage 1 (prefilter: learned, selection/ftw/learned.py) against brute force: the hashed
features against a per-token Python count, the online ridge against the closed-form weighted ridge, the
learning step against one-stage FTW, a scored step against exact FTW on the survivors it names, resume."""

from __future__ import annotations

import math

import pytest
import torch

from optsel.selection.ftw import FilterThenWeight, FTWConfig
from optsel.selection.ftw.learned import OnlineRidge, feature_dim, hashed_features, overlap_features

from support.bruteforce import make_batch, tiny_llama, train_steps

N, K, M = 10, 3, 6
P31 = 2_147_483_647


def _python_features(ids: list[int], labels: list[int], mask: list[int], buckets: int) -> list[float]:
    """φ of one sample, one token at a time with Python integers (the hash as the module documents it)."""

    def bucket(key: int, mult: int, add: int) -> int:
        return ((key % P31) * mult + add) % P31 % buckets

    parts = [[0.0] * buckets, [0.0] * buckets]  # prompt, response
    lengths = [0, 0]
    for t, (tok, lab, att) in enumerate(zip(ids, labels, mask)):
        if not att:
            continue
        part = 1 if lab != -100 else 0
        lengths[part] += 1
        parts[part][bucket(tok, 1_000_003, 7)] += 1
        if t > 0 and mask[t - 1]:
            parts[part][bucket(ids[t - 1] * 1_048_583 + tok, 999_983, 11)] += 1
    out: list[float] = []
    for counts in parts:
        norm = math.sqrt(sum(c * c for c in counts)) or 1.0
        out += [c / norm for c in counts]
    return out + [1.0, math.log1p(lengths[0]), math.log1p(lengths[1])]


def test_hashed_features_count_each_parts_unigrams_and_bigrams():
    batch = make_batch(7, 11, 5, prompt=3)
    batch["labels"][2] = -100  # a sample with no response: its response part is zero, not NaN
    buckets = 8
    phi = hashed_features(batch, buckets)
    assert phi.shape == (7, feature_dim(buckets)) and phi.dtype == torch.float64
    for i in range(7):
        want = _python_features(
            batch["input_ids"][i].tolist(), batch["labels"][i].tolist(), batch["attention_mask"][i].tolist(), buckets
        )
        torch.testing.assert_close(phi[i], torch.tensor(want, dtype=torch.float64), msg=f"sample {i}")
    assert float(phi[2, buckets : 2 * buckets].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="hashes token ids in"):
        hashed_features({**batch, "input_ids": batch["input_ids"] + 2_000_000}, buckets)


def _python_overlap(ids: list[int], labels: list[int], mask: list[int]) -> list[float]:
    """The 3 overlap shares of one sample with Python sets (the module's definition)."""
    prompt = [bool(a) and lab == -100 for a, lab in zip(mask, labels)]
    response = [bool(a) and lab != -100 for a, lab in zip(mask, labels)]
    prompt_tokens = {t for t, p in zip(ids, prompt) if p}
    prompt_bigrams = {(ids[t - 1], ids[t]) for t in range(1, len(ids)) if prompt[t - 1] and prompt[t]}
    tokens = [t for t, r in zip(ids, response) if r]
    bigrams = [(ids[t - 1], ids[t]) for t in range(1, len(ids)) if response[t - 1] and response[t]]
    share = lambda hits, n: hits / n if n else 0.0  # noqa: E731
    return [
        share(sum(t in prompt_tokens for t in tokens), len(tokens)),
        share(sum(b in prompt_bigrams for b in bigrams), len(bigrams)),
        share(sum((b, a) in prompt_bigrams for a, b in bigrams), len(bigrams)),
    ]


def test_overlap_features_are_the_prompt_response_shares():
    """A copied answer, a reversed one, a reordered one, a foreign one and random rows, against Python sets."""
    rows = [
        ([5, 6, 7, 8, 9], [5, 6, 7, 8, 9]),  # copy: every token and bigram in the prompt
        ([5, 6, 7, 8, 9], [9, 8, 7, 6, 5]),  # reversed: every reversed bigram in the prompt
        ([5, 6, 7, 8, 9], [6, 5, 8, 9, 7]),  # reordered: the tokens, a bigram (8, 9) and a reversed one (6, 5)
        ([5, 6, 7, 8, 9], [20, 21, 22]),  # foreign: nothing
        ([5, 6, 7], []),  # no response: zeros, not NaN
    ]
    T = 11
    ids = torch.zeros(len(rows), T, dtype=torch.int64)
    labels = torch.full((len(rows), T), -100, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(p) + len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    phi = hashed_features(batch, 8, overlap=True)
    assert phi.shape == (len(rows), feature_dim(8, overlap=True)) == (len(rows), 2 * 8 + 6)
    torch.testing.assert_close(phi[:, :-3], hashed_features(batch, 8))  # the same counts first
    want = [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.25, 0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(phi[:, -3:], torch.tensor(want, dtype=torch.float64))
    random = make_batch(9, 12, 3, prompt=5)
    random["input_ids"] = random["input_ids"] % 6 + 1  # a small vocabulary: many repeats and overlaps
    mask = random["attention_mask"].bool()
    got = overlap_features(random["input_ids"], mask & (random["labels"] == -100), mask & (random["labels"] != -100))
    for i in range(9):
        want_i = _python_overlap(
            random["input_ids"][i].tolist(), random["labels"][i].tolist(), random["attention_mask"][i].tolist()
        )
        torch.testing.assert_close(got[i], torch.tensor(want_i, dtype=torch.float64), msg=f"sample {i}")
    assert float(got[:, 0].min()) < 1.0 and float(got[:, 1].max()) > 0.0  # the check is not vacuous


def test_online_ridge_is_the_closed_form_decayed_weighted_ridge():
    gen = torch.Generator().manual_seed(0)
    dim, decay, lam = 5, 0.7, 0.3
    ridge = OnlineRidge(dim, decay, lam)
    steps = [
        (torch.randn(n, dim, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64))
        for n in (4, 6, 3)
    ]
    for X, y in steps:
        ridge.observe(X, y)
    # min_β Σ_s γ^(age_s) ‖X_s β − y_s‖² + λ‖β‖², solved as one least-squares problem
    rows, targets = [], []
    for age, (X, y) in enumerate(reversed(steps)):
        w = decay ** (age / 2)
        rows.append(w * X)
        targets.append(w * y)
    rows.append(math.sqrt(lam) * torch.eye(dim, dtype=torch.float64))
    targets.append(torch.zeros(dim, dtype=torch.float64))
    beta = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution
    torch.testing.assert_close(ridge.coefficients(), beta, rtol=1e-10, atol=1e-12)
    X_new = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ridge.predict(X_new), X_new @ beta, rtol=1e-10, atol=1e-12)
    assert ridge.observed == 13
    other = OnlineRidge(dim + 1, decay, lam)
    with pytest.raises(ValueError, match="do not fit D = 6"):
        other.load_state_dict(ridge.state_dict())


def _trained():
    model = tiny_llama().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    return model, opt


def _learned(model, opt, **kw) -> FilterThenWeight:
    config = FTWConfig(budget=K, filter_size=M, gram="exact", prefilter="learned", prefilter_features=16, **kw)
    return FilterThenWeight(model, opt, config, seed=3)


def test_learning_step_is_one_stage_ftw_and_a_scored_step_is_exact_ftw_on_its_survivors():
    model, opt = _trained()
    target = make_batch(4, 9, 99)
    first_pool, pool = make_batch(N, 9, 1), make_batch(N, 9, 2)
    ftw = _learned(model, opt, prefilter_learn_steps=1, prefilter_explore=0.34)
    first = ftw.select(first_pool, target)
    # the learning step: one-stage FTW whose filter keeps every candidate with u > 0 (stage 2 keeps every survivor)
    one = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=N, gram="exact")).select(first_pool, target)
    assert torch.equal(first.indices, one.indices)
    torch.testing.assert_close(first.weights, one.weights)
    torch.testing.assert_close(first.utility, one.utility)  # the learning step reports the exact u
    # no filter cap on a labelling step: every candidate with u > 0 reaches the QP (a pool that is its own target: 10 > M)
    own = _learned(model, opt, prefilter_learn_steps=1).select(first_pool, first_pool)
    positive = torch.nonzero(own.utility > 0).flatten()
    assert positive.numel() > M and set(own.filtered.tolist()) == set(positive.tolist())
    torch.testing.assert_close(first.alignment, one.alignment)
    # the regression saw every pool row with its exact u
    phi = hashed_features(first_pool, 16)
    torch.testing.assert_close(ftw.prefilter.ridge.A, phi.T @ phi)
    torch.testing.assert_close(ftw.prefilter.ridge.c, phi.T @ one.utility.double())

    drawn = torch.Generator()
    drawn.set_state(ftw.generator.get_state())
    sel = ftw.select(pool, target)
    beta = torch.linalg.solve(phi.T @ phi + torch.eye(phi.shape[1], dtype=torch.float64), phi.T @ one.utility.double())
    predicted = hashed_features(pool, 16) @ beta
    torch.testing.assert_close(sel.utility, predicted)  # a scored step reports û
    explore = round(0.34 * M)
    order = torch.sort(predicted, descending=True, stable=True).indices
    rest = order[M - explore :]
    survivors = torch.cat([order[: M - explore], rest[torch.randperm(rest.numel(), generator=drawn)[:explore]]])
    rows = survivors.sort().values
    exact = FilterThenWeight(model, opt, FTWConfig(budget=K, filter_size=M, gram="exact")).select(
        {key: v[rows] for key, v in pool.items()}, target
    )
    assert torch.equal(sel.indices, rows[exact.indices])
    torch.testing.assert_close(sel.weights, exact.weights)
    torch.testing.assert_close(sel.alignment[rows], exact.alignment)  # exact b at the survivors, NaN elsewhere
    assert bool(sel.alignment[[r for r in range(N) if r not in rows.tolist()]].isnan().all())
    assert sel.diagnostics["prefilter"] == "learned" and sel.diagnostics["stage1_survivors"] == M
    assert "stage1" in sel.timings


def test_learned_stage1_resumes_exactly():
    model, opt = _trained()
    target = make_batch(4, 9, 99)
    pools = [make_batch(N, 9, s) for s in range(4)]
    straight = _learned(model, opt)
    for p in pools[:2]:
        straight.select(p, target)
    state = straight.state_dict()
    resumed = _learned(model, opt)
    resumed.load_state_dict(state)
    for p in pools[2:]:
        a, b = straight.select(p, target), resumed.select(p, target)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights)
        torch.testing.assert_close(a.utility, b.utility)


def test_learned_config_errors_name_the_key():
    with pytest.raises(ValueError, match="prefilter_explore: applies to prefilter='learned' only"):
        FTWConfig(budget=2, prefilter="head", prefilter_explore=0.5)
    with pytest.raises(ValueError, match="prefilter_window: applies to prefilter='head' only"):
        FTWConfig(budget=2, prefilter="learned", prefilter_window=8)
    with pytest.raises(ValueError, match=r"prefilter_explore: must be in \[0, 1\]"):
        FTWConfig(budget=2, prefilter="learned", prefilter_explore=1.5)
    with pytest.raises(ValueError, match="prefilter_learn_steps: must be >= 1"):
        FTWConfig(budget=2, prefilter="learned", prefilter_learn_steps=0)
    with pytest.raises(ValueError, match=r"prefilter_decay: must be in \(0, 1\]"):
        FTWConfig(budget=2, prefilter="learned", prefilter_decay=0.0)
    with pytest.raises(ValueError, match="prefilter_ridge: must be a finite number > 0"):
        FTWConfig(budget=2, prefilter="learned", prefilter_ridge=float("nan"))
    with pytest.raises(ValueError, match="prefilter_features: must be >= 1"):
        FTWConfig(budget=2, prefilter="learned", prefilter_features=0)
    with pytest.raises(ValueError, match="prefilter_overlap: applies to prefilter='learned' only"):
        FTWConfig(budget=2, prefilter="head", prefilter_overlap=True)
    with pytest.raises(ValueError, match="prefilter_overlap: must be true or false"):
        FTWConfig(budget=2, prefilter="learned", prefilter_overlap=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefilter: 'learned' runs stage 2 with the exact b"):
        FTWConfig(budget=2, prefilter="learned", gram="sketch", exchange="sketches")


def test_score_stage2_trains_the_k_best_by_the_score_and_relabels_every_r_steps():
    model, opt = _trained()
    target = make_batch(4, 9, 99)
    pools = [make_batch(N, 9, 10 + s) for s in range(4)]
    ftw = FilterThenWeight(
        model,
        opt,
        FTWConfig(
            budget=K,
            gram="exact",
            prefilter="learned",
            prefilter_features=16,
            prefilter_stage2="score",
            prefilter_learn_steps=1,
            prefilter_label_every=3,
        ),
    )
    one_stage = FTWConfig(budget=K, gram="exact", filter_ratio=1.0)  # labelling: one stage, every u > 0 to the QP
    sels = [ftw.select(p, target) for p in pools]
    for step in (0, 3):  # the learning step, then every 3rd step after it
        want = FilterThenWeight(model, opt, one_stage).select(pools[step], target)
        assert torch.equal(sels[step].indices, want.indices), step
        torch.testing.assert_close(sels[step].weights, want.weights)
        assert sels[step].pool_pass is not None
    phi0 = hashed_features(pools[0], 16)
    u0 = FilterThenWeight(model, opt, one_stage).select(pools[0], target).utility.double()
    beta = torch.linalg.solve(phi0.T @ phi0 + torch.eye(phi0.shape[1], dtype=torch.float64), phi0.T @ u0)
    for step in (1, 2):  # scored: the k best by û, uniform weights, the trainer's own step
        predicted = hashed_features(pools[step], 16) @ beta
        torch.testing.assert_close(sels[step].utility, predicted)
        best = torch.sort(predicted, descending=True, stable=True).indices[:K].sort().values
        assert torch.equal(sels[step].indices, best)
        torch.testing.assert_close(sels[step].weights, torch.full((K,), 1.0 / K, dtype=torch.float64))
        assert sels[step].pool_pass is None and sels[step].diagnostics["prefilter_stage2"] == "score"
    assert ftw.prefilter.ridge.observed == 2 * N  # steps 0 and 3 labelled the whole pool
    with pytest.raises(ValueError, match="prefilter_label_every: applies to prefilter_stage2='score' only"):
        FTWConfig(budget=2, prefilter="learned", prefilter_label_every=4)
    with pytest.raises(ValueError, match="prefilter_stage2: 'score' applies to prefilter='learned' only"):
        FTWConfig(budget=2, prefilter="head", prefilter_stage2="score")
    with pytest.raises(ValueError, match="prefilter_stage2: applies to prefilter='head' only"):
        FTWConfig(budget=2, prefilter="learned", prefilter_stage2="head")


@pytest.mark.parametrize("learn, every", [(2, 16), (1, 3), (2, None), (1, 1)])
def test_equal_compute_schedule_is_the_selectors_labelling_schedule(learn, every):
    from benchmarks.quality_compute import labelling_schedule, scheduled_flops
    from optsel.selection.ftw.learned import LearnedPrefilter

    options = {"prefilter": "learned", "prefilter_stage2": "score", "prefilter_learn_steps": learn}
    if every is not None:
        options["prefilter_label_every"] = every
    assert labelling_schedule("ftw", options, 4) == (learn, every)
    assert (
        labelling_schedule("ftw", {"prefilter": "learned"}, 4) is None and labelling_schedule("random", {}, 4) is None
    )
    prefilter = LearnedPrefilter(FTWConfig(budget=4, **options), torch.Generator())
    labelled = []
    for _ in range(50):  # the selector's own decision, step by step (run() and score_only() both count a step)
        labelled.append(prefilter.labels_whole_pool())
        prefilter.steps += 1
    for steps in range(51):
        want = sum(labelled[:steps]) * 7.0 + (steps - sum(labelled[:steps])) * 1.0
        assert scheduled_flops(steps, 7.0, 1.0, learn, every) == want, steps


def test_stored_run_keys_leave_out_the_late_keys_at_their_default():
    from benchmarks.quality_runs import resolved_options
    from optsel.selection.ftw_config import LATE_KEYS

    plain = resolved_options("ftw", {}, 4)
    assert not set(LATE_KEYS) & set(plain) and plain["prefilter"] == "none"  # a stored one-stage run keeps its key
    learned = resolved_options("ftw", {"prefilter": "learned", "prefilter_explore": 1.0}, 4)
    assert learned["prefilter_explore"] == 1.0 and "prefilter_decay" not in learned
