"""Factor capture: Δ_iᵀA_i equals each sample's own gradient (run alone, unpadded); .grad untouched."""

from __future__ import annotations

import pytest
import torch

from optsel.selection.capture import capture_factors, find_covered_layers, plan_chunks, row_extents
from optsel.selection.single_pass import PoolPass, single_pass_leaves

from support.bruteforce import make_batch, per_sample_grads, tiny_gpt2, tiny_llama, tiny_lora_llama


def _max_rel_err(model, batch, chunk=None, tokens=None) -> float:
    cov = find_covered_layers(model)
    factors = capture_factors(model, batch, cov.layers, chunk_size=chunk, chunk_tokens=tokens)
    ref = per_sample_grads(model, batch, cov.names)
    worst = 0.0
    for l, layer in enumerate(cov.layers):
        G = factors.D[l].transpose(1, 2) @ factors.A[l]
        R = torch.stack([g[layer.name] for g in ref])
        R = R.transpose(1, 2) if layer.transposed else R
        worst = max(worst, float((G - R).norm() / R.norm()))
    return worst


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_lora_llama], ids=["llama", "gpt2-conv1d", "lora"])
def test_factors_equal_per_sample_gradients(builder):
    model = builder()
    # Llama's RMSNorm / rotary run in float32 even in a float64 model: ~1e-8 is its precision
    assert _max_rel_err(model, make_batch(5, 9, seed=1)) < 1e-6


def test_chunked_capture_matches_and_loss_is_per_sample():
    model = tiny_llama()
    batch = make_batch(5, 9, seed=3)
    cov = find_covered_layers(model)
    whole = capture_factors(model, batch, cov.layers)
    chunked = capture_factors(model, batch, cov.layers, chunk_size=2)
    for a, b in zip(whole.A + whole.D, chunked.A + chunked.D):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for i in range(5):
        one = {k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()}
        alone = capture_factors(model, one, cov.layers)
        torch.testing.assert_close(whole.loss[i : i + 1], alone.loss, rtol=1e-7, atol=0)


def test_length_sorted_passes_pay_for_tokens_and_stay_exact():
    """chunk_tokens t: rows sorted by length, each pass cut to its longest row and holding ≤ t token positions;
    every sample's Δᵀ A is still its own gradient (brute force), and the single pass's training gradient of
    weighted rows equals the one-pass capture's."""
    model = tiny_llama()
    batch = make_batch(9, 16, seed=5, min_len=3)
    ext = row_extents(batch)
    assert torch.equal(ext, batch["attention_mask"].sum(1))
    plan = plan_chunks(batch, chunk_tokens=24)
    assert sorted(r for c in plan for r in c.rows.tolist()) == list(range(9))
    for c in plan:
        assert c.width == int(ext[c.rows].max()) and (c.rows.numel() * c.width <= 24 or c.rows.numel() == 1)
    assert sum(c.rows.numel() * c.width for c in plan) < 9 * 16  # less padding than one padded pass
    assert _max_rel_err(model, batch, tokens=24) < 1e-6
    # more passes on demand (a sharded engine's agreed count): the longest split, every row once
    more = plan_chunks(batch, chunk_tokens=24, passes=len(plan) + 3)
    assert len(more) == len(plan) + 3 and sorted(r for c in more for r in c.rows.tolist()) == list(range(9))

    cov = find_covered_layers(model)
    leaves, why = single_pass_leaves(model)
    assert not why
    passes = {}
    for name, tokens in (("one", None), ("sorted", 24)):
        pool_pass = PoolPass()
        f = capture_factors(model, batch, cov.layers, pool_pass=pool_pass, leaves=leaves, chunk_tokens=tokens)
        rows, w = torch.tensor([7, 0, 4]), torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
        passes[name] = (f, pool_pass.local_grads(rows, w), pool_pass.loss)
    (one, g1, l1), (srt, g2, l2) = passes["one"], passes["sorted"]
    torch.testing.assert_close(l1, l2, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(one.tokens, srt.tokens)
    for p, g in g1.items():
        torch.testing.assert_close(g2[p], g, rtol=1e-6, atol=1e-9)


def test_coverage_of_conv1d_lora_and_tied_weights():
    gpt2 = find_covered_layers(tiny_gpt2())
    assert all(l.transposed for l in gpt2.layers if "transformer.h" in l.name)
    assert "transformer.h.0.attn.c_attn.weight" in gpt2.names

    lora = find_covered_layers(tiny_lora_llama())
    assert lora.names and all("lora_A" in n or "lora_B" in n for n in lora.names)
    assert not any("base_layer" in n for n in lora.names)

    tied = find_covered_layers(tiny_llama(tie=True))
    assert "lm_head.weight" not in tied.names
    assert "lm_head.weight" in tied.excluded and "embed_tokens" in tied.excluded["lm_head.weight"]
    untied = find_covered_layers(tiny_llama(tie=False))
    assert "lm_head.weight" in untied.names and not untied.excluded


def test_grads_untouched_and_padding_and_empty_samples():
    model = tiny_llama()
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.full_like(p, 0.5)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    batch = make_batch(4, 8, seed=5)
    batch["labels"][2] = -100  # a sample with no target tokens
    cov = find_covered_layers(model)
    factors = capture_factors(model, batch, cov.layers)
    for p, g in zip(params, before):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert factors.loss[2] == 0 and factors.tokens[2] == 0
    assert all(float(d[2].abs().max()) == 0.0 for d in factors.D)
    pad = batch["attention_mask"] == 0
    assert pad.any()
    for d in factors.D:  # exactly 0 on padding: what lets A go unmasked (see Factors)
        assert float(d[pad].abs().max()) == 0.0
