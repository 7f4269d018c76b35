"""The cost model's step FLOPs (selection/cost_model.py ``step_flops``, docs/design.md#two-stage) against FLOPs
counted by torch.utils.flop_counter on a real step of the selector (benchmarks/overhead.py's step: select, train
on the chosen rows, AdamW), one and two stages."""

from __future__ import annotations

import pytest
import torch

from optsel.selection.cost_model import HeadStageShape, StepShape, head_stage_cost, step_flops
from optsel.selection.ftw_config import FTWConfig

VARIANTS = [
    "ftw (one stage, exact b)",
    "ftw[head, m=2k]",
    "ftw[head, m=k, W=T/4]",
    "ftw[head, m=k, exit L=0]",
    "ftw[learned, m=k]",
]


@pytest.fixture(scope="module")
def counted():
    from benchmarks.overhead import table

    torch.manual_seed(0)
    return table(torch.device("cpu"), "small", 4, repeats=1, only=VARIANTS)


@pytest.mark.parametrize("label", VARIANTS)
def test_step_flops_predicts_the_counted_step(counted, label):
    from benchmarks.overhead import predicted_ratio

    got = counted["rows"][label]["flop_ratio"]
    pred = predicted_ratio(label, "small", counted["T"], counted["k"], counted["N"], counted["V"])
    assert pred is not None
    assert abs(pred - got) <= 0.15 * got, (label, pred, got)


def test_score_stage2_amortises_its_labelling_steps():
    one = step_flops(StepShape.of(FTWConfig(budget=4), 16, 4, 32, 2, 0.1))
    every = FTWConfig(budget=4, prefilter="learned", prefilter_stage2="score", prefilter_label_every=8)
    assert step_flops(StepShape.of(every, 16, 4, 32, 2, 0.1)) == pytest.approx((one + 7) / 8)
    never = FTWConfig(budget=4, prefilter="learned", prefilter_stage2="score")
    assert step_flops(StepShape.of(never, 16, 4, 32, 2, 0.1)) == 1.0


def test_step_shape_reads_the_config():
    two = FTWConfig(budget=4, prefilter="head", filter_size=8, prefilter_window=16, prefilter_depth=1)
    shape = StepShape.of(two, n=32, num_target=8, seq_len=64, layers=4, head=0.1)
    assert (shape.r, shape.v, shape.mu, shape.w, shape.s, shape.depth) == (8, 2, 2, 0.25, 2, 0.25)
    reuse = FTWConfig(budget=4, prefilter="head", prefilter_target="reuse", target_refresh=2)
    assert StepShape.of(reuse, 32, 8, 64, 4, 0.1).s == 0
    one = StepShape.of(FTWConfig(budget=4), 16, 4, 64, 4, 0.1)
    assert step_flops(one) == pytest.approx((3 * 4 + 3 * 1 + 1) / 3)
    # a window, an early exit and fewer survivors each make stage 1 / the step cheaper
    full = step_flops(StepShape.of(FTWConfig(budget=4, prefilter="head"), 32, 4, 64, 4, 0.1))
    for cheaper in (
        dict(prefilter_window=16),
        dict(prefilter_depth=0),
        dict(filter_size=4),
        dict(prefilter_stage2="head"),
    ):
        cfg = FTWConfig(budget=4, prefilter="head", **cheaper)  # type: ignore[arg-type]
        assert step_flops(StepShape.of(cfg, 32, 4, 64, 4, 0.1)) < full, cheaper


def test_head_stage_cost_moves_nothing_on_one_process():
    shape = dict(
        n=8,
        window=4,
        hidden=16,
        vocab=32,
        target_rows=2,
        target_len=4,
        scored_target_rows=2,
        forward_flops_per_token=100.0,
        survivors=4,
        esz=4,
    )
    one = head_stage_cost(HeadStageShape(world=1, **shape))  # type: ignore[arg-type]
    two = head_stage_cost(HeadStageShape(world=2, **shape))  # type: ignore[arg-type]
    kept = head_stage_cost(HeadStageShape(world=2, keep_factors=True, **shape))  # type: ignore[arg-type]
    assert one.bytes == 0 and two.bytes >= 2 * 32 * 16 * 4  # M and P gathered whole
    assert kept.bytes - two.bytes == 4 * 4 * (16 + 32) * 4  # + the survivors' head factors
    assert two.flops < one.flops  # the pool's forward is split over the ranks


def test_real_text_step_prices_the_grid_file_variants():
    """benchmarks/cost_model.py's real-text table reads the grid file: every FTW variant of ``real.variants``
    priced, the one-stage step (3r + 3v + 1)/3 from the grid's own N, k, |V|, and a window cheaper where the pool
    is wider."""
    from benchmarks.cost_model import REAL_GRID_FILE, REAL_TS, real_text_flops
    from benchmarks.quality_real import load_real_grid

    grid = load_real_grid(REAL_GRID_FILE)
    rows = {r["variant"]: r for r in real_text_flops()}
    assert set(rows) == {"ftw"} | {lab for lab, (m, _) in grid.variants.items() if m == "ftw"}
    k = grid.cells[0].budget
    r, v = grid.settings.pool / k, grid.settings.num_target / k
    for T in REAL_TS:
        assert rows["ftw"][f"T{T}"] == pytest.approx((3 * r + 3 * v + 1) / 3)
    windowed = [lab for lab, (_, opts) in grid.variants.items() if opts.get("prefilter_window")]
    for lab in windowed:
        assert rows[lab][f"T{REAL_TS[-1]}"] < rows[lab][f"T{REAL_TS[0]}"]
