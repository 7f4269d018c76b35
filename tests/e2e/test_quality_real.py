"""The real-text quality grid at tiny size: a pysource tree, the tiny BPE and base built here, random, the
oracle and FTW on one cell with two paired seeds; stored runs are reused, and the grid file's real section
is read strictly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from benchmarks import quality_real as qr
from benchmarks.real_text import TINY, build_tokenizer_folder
from optsel.pipeline.data.tokenizer import load_tokenizer

from support.common import REPO
from support.pysource_tree import write_tree


def tiny_grid(tree: Path) -> qr.RealGrid:
    return qr.RealGrid(
        source={"include_stdlib": False, "roots": [str(tree)], "target_prefixes": ["tpkg"], "val_fraction": 0.3},
        base=TINY,
        settings=qr.RealSettings(
            pool=8,
            steps=3,
            eval_every=3,
            num_target=3,
            num_eval=5,
            max_new_tokens=6,
            optimizer={"lr": 1e-3, "warmup_steps": 1},
            seeds=[0, 1],
        ),
        cells=[qr.RealCell(0.3, 0.25, 2), qr.RealCell(0.3, 0.0, 2)],
        methods=["random", "oracle", "ftw"],
        seed_blocks=[[0, 1]],
    )


@pytest.mark.slow
def test_tiny_real_grid_runs_reports_and_reuses_its_runs(tmp_path):
    grid = tiny_grid(write_tree(tmp_path / "src"))
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = qr.run_grid(grid, out, cache=cache, workers=1)
    cell = result["cells"][0]
    assert cell["cell"] == "real-t30-c25-k2" and cell["seeds"] == [0, 1]
    assert set(cell["methods"]) == {"random", "oracle", "ftw"}
    # the oracle trains on clean targets (topped up from other kinds when a pool holds fewer than k);
    # random spreads its weight over the kinds in the pool
    w = {m: cell["methods"][m]["precision"] for m in ("oracle", "random")}
    assert w["oracle"]["target"] > w["random"]["target"] and w["random"]["target"] < 1.0
    assert set(cell["kind_counts"]) <= set(qr.KINDS) and cell["kind_counts"]["corrupted"] > 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert len(runs) == 12 and result["cells"][1]["kind_counts"].get("corrupted", 0) == 0
    for r in runs:
        assert sorted(map(int, r["curve"])) == [0, 3]
        for step, rouge in r["rouge_curve"].items():
            assert 0.0 <= r["em_curve"][step] <= rouge <= 1.0 or r["em_curve"][step] == 0.0
    for summary in result["cells"]:  # each cell's own runs' final ROUGE-L, mean over its seeds
        for method in ("random", "oracle", "ftw"):
            mine = [r for r in runs if r["method"] == method and r["cell"] == summary["cell"]]
            finals = [r["rouge_curve"][str(max(map(int, r["rouge_curve"])))] for r in mine]
            assert len(finals) == 2
            assert summary["methods"][method]["final_rouge_l"][0] == pytest.approx(sum(finals) / len(finals))
    readme = (out / "README.md").read_text()
    assert "first-line ROUGE-L F" in readme and "w on distractor/text" in readme
    assert (out / "curves.png").is_file() and (out / "gap_closed.png").is_file()
    stored = sorted(p.name for p in (out / "runs").rglob("*.json"))
    assert len(stored) == 12
    # a second call reuses every stored run (report only: nothing missing, so nothing runs)
    again = qr.run_grid(grid, out, cache=cache, workers=1, report_only=True)
    assert again["cells"][0]["methods"]["ftw"]["final_loss"] == cell["methods"]["ftw"]["final_loss"]
    # a changed setting is a different run: nothing stored matches it
    changed = replace(grid, settings=replace(grid.settings, steps=2))
    assert all(c["methods"] == {} for c in qr.run_grid(changed, out, cache=cache, workers=1, report_only=True)["cells"])


def test_real_stream_holds_out_a_disjoint_target_and_eval_set(tmp_path):
    grid = tiny_grid(write_tree(tmp_path / "src"))
    corpus = qr.collect(grid.source_config())
    tok = load_tokenizer(build_tokenizer_folder(corpus, TINY, tmp_path / "cache")[0])
    data = qr.real_stream(grid, corpus, tok, grid.cells[0], seed=0)
    s = data.stream
    assert s.target["input_ids"].shape[0] == 3 and sum(b["input_ids"].shape[0] for b in s.eval_batches) == 5
    assert len(data.references) == 5 and all(data.references)
    # loss only on the docstring and EOS: the target and eval rows' prompts are unlabelled
    for batch in [s.target, *s.eval_batches]:
        assert bool((batch["labels"][:, 0] == -100).all())

    # the train rows' prompts never repeat an eval or target prompt (the held-out functions)
    def prompts(batch):
        rows = []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            start = int((labels != -100).nonzero()[0]) if bool((labels != -100).any()) else int(mask.sum())
            rows.append(tuple(ids[:start].tolist()))
        return {r for r in rows if r}

    held = prompts(s.target) | set().union(*(prompts(b) for b in s.eval_batches))
    assert held and not held & prompts(s.train)
    with pytest.raises(ValueError, match="num_target \\+ num_eval"):
        qr.real_stream(replace(grid, settings=replace(grid.settings, num_eval=50)), corpus, tok, grid.cells[0], 0)


def test_the_grid_files_real_section_is_read_strictly(tmp_path):
    grid = qr.load_real_grid(REPO / "benchmarks/quality_grid.yaml")
    assert [c.name for c in grid.cells] == [
        "real-t05-c25-k4",
        "real-t20-c25-k4",
        "real-t05-c00-k4",
        "real-t20-c00-k4",
    ]
    assert all(c.budget * 8 == grid.settings.pool for c in grid.cells)  # k/N = 1/8
    assert {"random", "oracle", "ftw", "full"} <= set(grid.methods)
    text = yaml.safe_load((REPO / "benchmarks/quality_grid.yaml").read_text())
    for where, patch, key in [
        ("settings", {"pool_size": 3}, "real.settings"),
        ("base", {"hiden": 3}, "real.base"),
        ("source", {"docstring": "half"}, "docstring"),
    ]:
        bad = {**text, "real": {**text["real"], where: {**(text["real"][where] or {}), **patch}}}
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises((ValueError, TypeError), match=key):
            qr.load_real_grid(path)
    with pytest.raises(ValueError, match="real-t<target"):
        qr.RealCell.parse("t05-c25-lh-k8")
    # variants: a selector with options, keyed by label (a plain method keeps its key: stored runs stay valid)
    assert grid.method_of("ftw_head") == ("ftw", {"prefilter": "head", "filter_size": 8})
    assert grid.method_of("random") == ("random", {})
    for variants, key in [
        ({"ftw_x": {"method": "ftw", "options": {"prefilter": "tail"}}}, "prefilter"),
        ({"ftw_x": {"method": "ftw", "opts": {}}}, "real.variants.ftw_x"),
        ({"ftw": {"method": "ftw"}}, "also a method"),
    ]:
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({**text, "real": {**text["real"], "variants": variants}}))
        with pytest.raises((ValueError, TypeError), match=key):
            qr.load_real_grid(path)
