"""LoRA's step cost: what the capture covers, and the packed all-gather of the factors.

Under ZeRO-3 a LoRA step paid one all-gather pair per covered layer and factor (A and Δ): 4 collectives a
layer, and LoRA has twice as many (thin) covered layers as the weights it adapts. ``gather_factors`` now
packs every layer into one all-gather. These tests check the packed gather against the per-layer one
bit for bit on 2 gloo ranks (uneven rows, one rank empty, per-rank widths), count its collectives, and
check that LoRA FTW's b, u and K over 2 ranks still equal brute-force per-sample gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optsel import distributed
from optsel.selection import FilterThenWeight, FTWConfig
from optsel.selection.capture import Factors, find_covered_layers, gather_factors

from support.bruteforce import brute_force, make_batch, tiny_lora_llama, train_steps
from support.dist import run_distributed

N_POOL, N_TARGET = 8, 4
LAYER_DIMS = [(16, 4), (4, 16), (16, 4), (4, 16), (24, 3)]  # (d_in, d_out): LoRA-like thin factors


def _factors(rank: int, n: int) -> Factors:
    gen = torch.Generator().manual_seed(10 + rank)
    widths = [3 + rank + i % 2 for i in range(len(LAYER_DIMS))]  # per-rank, per-layer T
    A = [torch.randn(n, w, d_in, generator=gen) for w, (d_in, _) in zip(widths, LAYER_DIMS)]
    D = [torch.randn(n, w, d_out, generator=gen) for w, (_, d_out) in zip(widths, LAYER_DIMS)]
    return Factors(A, D, torch.rand(n, generator=gen), torch.randint(1, 9, (n,), generator=gen))


def _per_layer_gather(f: Factors, dtype: torch.dtype) -> Factors:
    """The gather as it was before the packing: one all-gather per layer and factor."""
    A, D = [a.to(dtype) for a in f.A], [d.to(dtype) for d in f.D]
    widths = distributed.all_reduce_max(torch.tensor([a.shape[1] for a in A]))
    pad = lambda t, w: F.pad(t, (0, 0, 0, int(w) - t.shape[1]))  # noqa: E731
    return Factors(
        [distributed.all_gather_cat(pad(a, w)) for a, w in zip(A, widths)],
        [distributed.all_gather_cat(pad(d, w)) for d, w in zip(D, widths)],
        distributed.all_gather_cat(f.loss),
        distributed.all_gather_cat(f.tokens),
    )


def _gather_cases(rank: int) -> dict:
    out = {}
    for case, rows in (("uneven", (3, 2)), ("one rank empty", (4, 0))):
        f = _factors(rank, rows[rank])
        comm = distributed.CommCounter()
        packed = gather_factors(f, torch.float64, comm)
        out[case] = {"packed": packed, "reference": _per_layer_gather(f, torch.float64), "calls": comm.calls}
    return out


def _body(rank: int, world: int) -> dict:
    """Both tests' ranks in one spawn (a spawn costs seconds): the gather cases, then LoRA FTW per exchange."""
    return {"gather": _gather_cases(rank), "lora": {ex: _lora_select(rank, ex) for ex in ("factors", "direction")}}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(_body, 2, timeout_s=240)


@pytest.mark.distributed
def test_packed_gather_equals_the_per_layer_gather_in_7_collectives(two_ranks):
    results = [r["gather"] for r in two_ranks]
    for case in ("uneven", "one rank empty"):
        for r in results:
            packed, ref = r[case]["packed"], r[case]["reference"]
            assert packed.num_samples == ref.num_samples == (5 if case == "uneven" else 4)
            for got, want in zip(packed.A + packed.D, ref.A + ref.D):
                assert got.dtype == torch.float64 and got.shape == want.shape
                assert torch.equal(got, want)
            assert torch.equal(packed.loss, ref.loss) and torch.equal(packed.tokens, ref.tokens)
            # the widths' all-reduce, then three all_gather_cat (2 collectives each: sizes, data); the
            # per-layer gather took 4 per layer + 5 = 25 for these 5 layers
            assert r[case]["calls"] == 7, r[case]["calls"]
    # rank 0's rows come first and are its own factors, padded to the wider rank's T
    mine = _factors(0, 3)
    got = results[0]["uneven"]["packed"]
    assert torch.equal(got.A[0][:3, : mine.A[0].shape[1]], mine.A[0].double())
    assert bool((got.A[0][:3, mine.A[0].shape[1] :] == 0).all())


def _trained_lora():
    model = tiny_lora_llama()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1
    )
    train_steps(model, opt, 3)
    return model, opt


def _pool_and_target():
    return make_batch(N_POOL, 9, seed=11), make_batch(N_TARGET, 7, seed=12)


def _lora_select(rank: int, exchange: str) -> dict:
    model, opt = _trained_lora()  # the same replica on both ranks (plain data parallelism)
    pool, target = _pool_and_target()
    cut_pool, cut_target = (0, 5, N_POOL), (0, 2, N_TARGET)  # uneven pool halves: 5 and 3 rows
    mine = lambda b, cut: {k: v[cut[rank] : cut[rank + 1]] for k, v in b.items()}  # noqa: E731
    cfg = FTWConfig(budget=3, filter_size=N_POOL, gram="exact", compute_dtype="float64", exchange=exchange)
    sel = FilterThenWeight(model, opt, cfg).select(mine(pool, cut_pool), mine(target, cut_target))
    return {
        "alignment": sel.alignment,
        "utility": sel.utility,
        "gram": sel.gram,
        "filtered": sel.filtered,
        "covered": list(sel.covered),
        "rho": sel.diagnostics["momentum_coef"],
        "tau": sel.diagnostics["curvature"],
        "batch_share": cfg.budget if cfg.filter_curvature == "batch" else None,
    }


@pytest.mark.distributed
@pytest.mark.parametrize("exchange", ["factors", "direction"])
def test_lora_ftw_on_two_ranks_equals_brute_force(two_ranks, exchange):
    results = [r["lora"][exchange] for r in two_ranks]
    model, opt = _trained_lora()
    pool, target = _pool_and_target()
    r0 = results[0]
    b, K, u = brute_force(model, opt, pool, target, r0["covered"], r0["rho"], r0["tau"], batch_share=r0["batch_share"])
    for r in results:
        assert r["alignment"].shape == (N_POOL,)
        torch.testing.assert_close(r["alignment"], b, rtol=1e-6, atol=1e-9 * float(b.abs().max()))
        torch.testing.assert_close(r["utility"], u, rtol=1e-6, atol=1e-9 * float(u.abs().max()))
        f = r["filtered"]
        torch.testing.assert_close(r["gram"], K[f][:, f], rtol=1e-6, atol=1e-9 * float(K.abs().max()))


def test_lora_capture_covers_exactly_the_adapter_factors():
    """The frozen base weights' Linear layers are not captured: the covered weights are exactly the
    trainable LoRA A and B matrices, every one of them."""
    model = tiny_lora_llama()
    covered = find_covered_layers(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(covered.names) == trainable and len(covered.names) == len(trainable) == 4  # q, v: A and B
    assert all(".lora_A." in n or ".lora_B." in n for n in covered.names)
    assert {layer.d_out for layer in covered.layers if ".lora_A." in layer.name} == {4}  # rank r = 4
    base = [m for n, m in model.named_modules() if n.endswith("base_layer")]
    assert base and all(not m.weight.requires_grad for m in base)
    assert not {id(m) for m in base} & {id(layer.module) for layer in covered.layers}


@pytest.mark.slow
def test_bench_speed_lora_rows_quick(tmp_path):
    """`python -m benchmarks.speed --lora-only --quick`: the LoRA rows against the plain LoRA step on k."""
    import json

    from benchmarks import speed

    speed.main(["--lora-only", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "speed_lora.json").read_text())
    rows = data["lora"]["small"]["rows"]
    assert list(rows) == [name for name, *_ in speed.LORA_CONFIGS]
    ref = rows["lora random (the reference)"]
    assert ref["ratio_to_plain"] == 1.0 and ref["flop_ratio"] == 1.0 and ref["flops"] > 0
    for name in ("lora ftw[auto]", "lora ftw[exact]", "full-FT ftw[auto]"):
        assert rows[name]["flop_ratio"] > 1 and len(rows[name]["ratios"]) == data["meta"]["repeats"]
    # counted FLOPs: the same k rows, but full fine-tuning also forms the frozen weights' gradients
    assert rows["full-FT random"]["flop_ratio"] > 1
    md = (tmp_path / "speed_lora.md").read_text()
    assert "python -m benchmarks.speed --lora-only --quick" in md and "| lora ftw[auto] |" in md
