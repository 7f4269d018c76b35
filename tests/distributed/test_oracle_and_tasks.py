"""The quality benchmark's instrument: selectable target tasks with their corruption rules and
look-alikes, the oracle reference selector (1 and 2 ranks), and the grid's statistics."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from optsel.pipeline.data.synthetic import TARGET_TASKS, SyntheticConfig, generate, look_alike
from optsel.selection.base import get_selector_factory

from support.common import REPO

KINDS = {0: "target", 1: "corrupted", 2: "distractor/reverse"}


@pytest.mark.parametrize("task", sorted(TARGET_TASKS))
def test_corrupted_answers_are_wrong_and_of_the_right_form(task):
    like = look_alike(task)
    cfg = SyntheticConfig(
        num_train=400,
        num_val=40,
        target_task=task,
        target_fraction=0.3,
        corrupted_fraction=0.3,
        distractors=[like, "count"],
    )
    train, val = generate(cfg, 5)
    assert Counter(s["kind"] for s in train)["corrupted"] == 120
    solve = {
        "copy": lambda s: s,
        "reverse": lambda s: s[::-1],
        "sort": lambda s: "".join(sorted(s)),
        "addition": lambda s: str(sum(int(x) for x in s.split("+"))),
    }[task]
    for s in train + val:
        if s["kind"] not in ("target", "corrupted"):
            continue
        body = s["prompt"].split(":", 1)[-1].rstrip("=")
        truth = solve(body)
        if s["kind"] == "target":
            assert s["answer"] == truth, s
        else:
            assert s["answer"] != truth, s
            assert s["answer"].isdigit() == truth.isdigit()
            if task != "addition":  # same length and alphabet: only the mapping is wrong
                assert len(s["answer"]) == len(truth) and set(s["answer"]) <= set("abcdefghij0123456789")
    assert all(s["kind"] == "target" for s in val)
    assert not {s["prompt"] for s in val} & {s["prompt"] for s in train}
    with pytest.raises(ValueError, match="^distractors: "):
        SyntheticConfig(target_task=task, distractors=[{"addition": "add"}.get(task, task)])
    with pytest.raises(ValueError, match="^target_task: "):
        SyntheticConfig(target_task="poetry")


def _pool(kind_ids: list[int]) -> dict[str, torch.Tensor]:
    n = len(kind_ids)
    ids = torch.randint(3, 50, (n, 6), generator=torch.Generator().manual_seed(0))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "kind_id": torch.tensor(kind_ids),
    }


def test_oracle_spends_the_budget_on_clean_targets_and_refuses_without_kinds():
    oracle = get_selector_factory("oracle")(budget=3, seed=1, kind_names=KINDS)
    sel = oracle.select(_pool([1, 0, 2, 0, 0, 1, 0, 2]))
    assert sel.indices.numel() == 3 and set(sel.indices.tolist()) <= {1, 3, 4, 6}
    assert torch.allclose(sel.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    short = oracle.select(_pool([1, 0, 2, 2, 1, 2]))  # one clean target: topped up with others
    assert 1 in short.indices.tolist() and short.indices.numel() == 3
    state = oracle.state_dict()
    a = oracle.select(_pool([0] * 8))
    oracle.load_state_dict(state)
    assert torch.equal(a.indices, oracle.select(_pool([0] * 8)).indices)
    no_kind = _pool([0, 0, 1])
    del no_kind["kind_id"]
    with pytest.raises(ValueError, match="oracle: the pool has no kind_id"):
        oracle.select(no_kind)
    with pytest.raises(ValueError, match="oracle: .* no 'target'"):
        get_selector_factory("oracle")(budget=3, kind_names={0: "a", 1: "b"})


def _oracle_body(rank: int, world_size: int) -> list[int]:
    kinds = [1, 0, 2, 0, 2, 0, 1, 1, 0, 2]
    local = _pool(kinds[rank * 5 : (rank + 1) * 5])
    sel = get_selector_factory("oracle")(budget=3, seed=4, kind_names=KINDS).select(local)
    return sel.indices.tolist() + [-1] + (sel.local_indices + 5 * rank).tolist()


def test_oracle_two_ranks_select_what_one_process_selects():
    sys.path.insert(0, str(Path(__file__).parent))
    from support.dist import run_distributed

    single = (
        get_selector_factory("oracle")(budget=3, seed=4, kind_names=KINDS)
        .select(_pool([1, 0, 2, 0, 2, 0, 1, 1, 0, 2]))
        .indices.tolist()
    )
    results = run_distributed(_oracle_body, world_size=2)
    glob = [r[: r.index(-1)] for r in results]
    local = [r[r.index(-1) + 1 :] for r in results]
    assert glob[0] == glob[1] == single and sorted(local[0] + local[1]) == single


def test_grid_statistics_gap_closed_validity_and_ci():
    sys.path.insert(0, str(REPO))
    from benchmarks.quality_report import cell_summary, mean_ci, overall
    from benchmarks.quality_runs import RunResult

    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and h == pytest.approx(4.302652729 * 1.0 / 3**0.5, rel=1e-6)

    def r(method, seed, loss):
        out = RunResult(
            method=method,
            cell="c",
            seed=seed,
            curve={0: 3.0, 10: loss},
            em_curve={0: 0.0, 10: 0.5},
            seconds={0: 0.0, 10: 1.0},
            precision={"target": 0.5, "corrupted": 0.5},
        )
        return out

    runs = (
        [r("random", s, 2.0 + 0.01 * s) for s in range(4)]
        + [r("oracle", s, 1.0 + 0.01 * s) for s in range(4)]
        + [r("x", s, 1.5 + 0.01 * s) for s in range(4)]
    )
    s = cell_summary("c", runs)
    assert s["valid"] and s["methods"]["x"]["gap_closed"] == pytest.approx(0.5)
    assert s["methods"]["x"]["beats_random"] and s["methods"]["x"]["diff_to_random"][0] == pytest.approx(-0.5)
    noisy = [r("random", s_, 2.0 + (0.5 if s_ % 2 else -0.5)) for s_ in range(4)] + [
        r("oracle", s_, 1.99 - (0.5 if s_ % 2 else -0.5)) for s_ in range(4)
    ]
    bad = cell_summary("c", noisy)
    assert not bad["valid"] and bad["methods"]["oracle"]["gap_closed"] is None
    assert overall([s, bad])["x"] == {"mean_gap_closed": pytest.approx(0.5), "valid_cells": 1, "beats_random_cells": 1}
    # a grid cut short: random and the oracle on 4 seeds, y on seed 3 only — its gap is seed 3's, paired
    short = cell_summary("c", runs + [r("y", 3, 1.53)])
    y = short["methods"]["y"]
    assert y["gap_seeds"] == [3] and y["gap_closed"] == pytest.approx(0.5) and not y["beats_random"]
