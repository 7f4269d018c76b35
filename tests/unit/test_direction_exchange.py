"""exchange="direction" without processes: config keys, the cost model behind gram "auto", the
single-process path against the factors exchange. The 2-rank equivalence on FSDP2 and ZeRO-3 (odd sizes,
brute force, bytes) is in tests/test_sharded_ftw.py."""

from __future__ import annotations

import pytest
import torch

from optsel.selection import cost_model
from optsel.selection.ftw import FilterThenWeight, FTWConfig

from support.bruteforce import make_batch, tiny_llama, train_steps
from support.common import REPO


def test_direction_is_the_default_and_its_keys_are_validated_by_name():
    from optsel.pipeline.train.run_config import ConfigError, load_run_config

    assert FTWConfig(budget=2).exchange == "direction"
    config = load_run_config(
        REPO / "configs/demo.yaml",
        ["selection.options.ftw.direction_dtype=bfloat16", "selection.options.ftw.direction_cache=true"],
    )
    ftw_block = config.selection.options["ftw"]
    assert (ftw_block["exchange"], ftw_block["direction_dtype"], ftw_block["direction_cache"]) == (
        "direction",
        "bfloat16",
        True,
    )
    with pytest.raises(ConfigError, match=r"selection.options.ftw.exchange.*'direction', 'factors', 'sketches'"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.exchange=scalars"])
    with pytest.raises(ConfigError, match=r"selection.options.ftw.direction_dtype"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.direction_dtype=float16"])
    with pytest.raises(ConfigError, match=r"selection.options.ftw.direction_dtype.*exchange='direction' only"):
        load_run_config(
            REPO / "configs/demo.yaml",
            ["selection.options.ftw.exchange=factors", "selection.options.ftw.direction_dtype=bfloat16"],
        )
    with pytest.raises(ConfigError, match=r"selection.options.ftw.direction_cache"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.direction_cache=sometimes"])


def _choose(exchange, **kw):
    shape = dict(T=2048, d_in=4096, d_out=4096, n=64, m=32, world=8, k_out=32, k_in=32, max_temp_elems=1 << 24)
    shape.update(kw)
    return cost_model.choose_backend(exchange, **shape)


def test_auto_weighs_bytes_and_flops_with_n_and_m():
    # direction at a 7B layer: the survivors' factors (m·T·Σd) dwarf their sketches (m·k²) -> sketch
    assert _choose("direction") == "sketch"
    # ... but with few short survivors the exact Gram's extra bytes (P, m·T·Σd) are within the slack
    assert _choose("direction", T=16, m=4, n=8, d_in=64, d_out=64) == "exact"
    # factors: every candidate's factors are shipped anyway: FLOPs decide; small d → exact
    assert _choose("factors", T=64, d_in=64, d_out=64) == "exact"
    # sketch is the only backend of exchange sketches; ghost only while T² fits
    assert _choose("sketches") == "sketch"
    assert _choose("factors", T=8192, d_in=8192, d_out=8192, max_temp_elems=1 << 20) != "ghost"
    # N and m enter: the same layer goes from a factor-based Gram to sketches as the survivors grow
    picks = [_choose("direction", T=64, d_in=256, d_out=256, n=n, m=n // 2, world=2) for n in (2, 4096)]
    assert picks[0] in ("exact", "ghost") and picks[1] == "sketch", picks
    assert _choose("factors", T=64, d_in=256, d_out=256, n=2, m=1, world=2) == "exact"


def test_layer_cost_counts_the_direction_gather_and_nothing_per_candidate():
    kw = dict(T=2048, d_in=4096, d_out=4096, m=32, world=8, k_out=32, k_in=32)
    small = cost_model.layer_cost("direction", "sketch", n=64, **kw)
    large = cost_model.layer_cost("direction", "sketch", n=256, **kw)
    assert small.bytes == large.bytes == 4096 * 4096 * 4 + (8192 + 1) * 4 + 32 * 32 * 32 * 4
    factors = cost_model.layer_cost("factors", "exact", n=64, **kw)
    assert factors.bytes == 64 * 2048 * 8192 * 4
    assert cost_model.layer_cost("direction", "sketch", n=64, esz=4, wire_esz=2, **kw).bytes < small.bytes
    assert cost_model.layer_cost("direction", "sketch", n=64, **{**kw, "world": 1}).bytes == 0.0


def test_cost_model_counts_the_engines_gradient_dtype_from_their_configs(monkeypatch, tmp_path):
    """The engines' bytes follow the shipped configs (fp32 gradient reduce), and a bf16 DeepSpeed config halves
    its gradient term; the 8B verdict is computed from the rows (nothing about the bar is written in)."""
    import json

    from benchmarks import cost_model as bench

    assert bench.shipped_grad_wire_bytes() == {"zero3": 4, "fsdp2": 4}
    llama8b = next(m for m in bench.MODELS if m.name == "Llama 8B")
    P, root = llama8b.params, llama8b.root_params
    assert bench.engine_bytes(llama8b, {"zero3": 4, "fsdp2": 4}) == {"zero3": 8 * P, "fsdp2": 6 * P + 2 * (P - root)}
    bf16_cfg = tmp_path / "zero3_bf16.json"
    bf16_cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}, "communication_data_type": "bf16"}))
    monkeypatch.setattr("optsel.resources.default_deepspeed_config", lambda: str(bf16_cfg))
    assert bench.shipped_grad_wire_bytes()["zero3"] == 2
    monkeypatch.undo()
    rows = bench.table([llama8b])
    lines = bench.verdict(rows)
    worst_shipped = max(r["direction"] / r[e] for r in rows for e in ("zero3", "fsdp2"))
    assert worst_shipped < max(r["direction"] / r[e] for r in rows for e in ("zero3_bf16_grad", "fsdp2_bf16_grad"))
    assert ("met" if worst_shipped <= 0.5 else "NOT met") in lines[0].rsplit(":", 1)[1]


@pytest.mark.parametrize("gram", ["exact", "ghost", "sketch"])
def test_one_process_direction_equals_factors(gram):
    """R = 1: direction computes b with the whole M locally; b, diag, K equal the factors exchange's."""
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2)
    pool, target = make_batch(10, 8, seed=1), make_batch(4, 8, seed=2)
    out = {}
    for exchange in ("factors", "direction"):
        cfg = FTWConfig(budget=3, filter_size=6, gram=gram, exchange=exchange, sketch_dim_out=4, sketch_dim_in=4)
        out[exchange] = FilterThenWeight(model, opt, cfg, seed=3).select(pool, target)
    a, b = out["factors"], out["direction"]
    torch.testing.assert_close(b.alignment, a.alignment, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.utility, a.utility, rtol=1e-10, atol=1e-12)
    assert torch.equal(b.filtered, a.filtered) and torch.equal(b.indices, a.indices)
    torch.testing.assert_close(b.gram, a.gram, rtol=1e-10, atol=1e-12)
    assert b.diagnostics["exchange"] == "direction" and b.diagnostics["comm_bytes"] == 0


def test_selector_engine_bytes_ratio_and_phase_bytes_reach_prometheus():
    from prometheus_client import CollectorRegistry

    from optsel.monitoring.metrics import OptselMetrics
    from optsel.selection.base import Selection
    from optsel.selection.stats import selection_metrics

    sel = Selection(
        indices=torch.tensor([0]),
        weights=torch.tensor([1.0], dtype=torch.float64),
        local_indices=torch.tensor([0]),
        local_weights=torch.tensor([1.0], dtype=torch.float64),
        pool_size=2,
        diagnostics={
            "comm_bytes": 300,
            "engine_bytes_estimate": 1200,
            "comm_by_phase": {"gather": 200, "survivors": 100},
        },
    )
    flat = selection_metrics(sel)
    assert flat["select/engine_bytes_ratio"] == 0.25
    assert flat["select/comm_phase_bytes/gather"] == 200 and flat["select/comm_phase_bytes/survivors"] == 100
    registry = CollectorRegistry()
    OptselMetrics(registry, rank=0, job_level=True, labels={"engine": "fsdp2", "method": "ftw"}).update(flat, step=1)
    labels = {"run": "", "engine": "fsdp2", "method": "ftw", "rank": "0"}
    assert registry.get_sample_value("optsel_selection_engine_bytes_ratio", labels) == 0.25
    assert registry.get_sample_value("optsel_selection_phase_comm_bytes_total", {**labels, "phase": "gather"}) == 200
    assert "engine_bytes_ratio" not in " ".join(
        selection_metrics(
            Selection(
                indices=sel.indices,
                weights=sel.weights,
                local_indices=sel.local_indices,
                local_weights=sel.local_weights,
                pool_size=2,
                diagnostics={"comm_bytes": 0},
            )
        )
    )
