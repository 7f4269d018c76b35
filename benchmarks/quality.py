"""Quality benchmark: can selectors beat random at an equal budget, and does FTW?

    python -m benchmarks.quality [--cells default|all|NAME,...] [--methods a,b] [--variants all|a,b]
                                 [--workers 2] [--out results/quality] [--quick]
    python -m benchmarks.quality --section muon --variants all --workers 1 --out results/quality_muon

Every setting, the full grid, the default subset of cells and the named FTW variants are in
``benchmarks/quality_grid.yaml`` (written before the results were seen). Per cell (target fraction,
corrupted fraction, look-alike distractor heavy/absent, budget k of N) a tiny Llama pre-trained on
the distractors plus a little of the target task is fine-tuned with every selector for the same
steps, on the same stream order and target set per seed (paired seeds). Reported: final target loss
and exact match, the paired difference to random with its 95 % CI, the gap closed
(L_random − L_method) / (L_random − L_oracle) in valid cells (where the oracle beats random), weight
per kind and ESS; curves vs step and vs wall-clock seconds; a gap-closed heat map.

Finished runs are kept under ``<out>/runs/`` keyed by settings, cell, method, options and seed, so an
interrupted or extended grid only runs what is missing (``--fresh`` ignores them; nothing is deleted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from itertools import product
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks import quality_report as report
from benchmarks.quality_runs import (
    Cell,
    RunResult,
    Settings,
    build_stream,
    pretrain,
    resolved_options,
    run,
    synthetic_config,
)
from optsel.pipeline.files import jsonio

GRID_FILE = Path(__file__).with_name("quality_grid.yaml")
PROBED = ("ftw",)  # methods whose per-kind alignment is recorded along training


#: grid-file sections that replace the settings' overrides, cells, methods and variants (``--section``)
SECTIONS = ("muon",)
SECTION_KEYS = {"settings", "cells", "methods", "variants", "seed_blocks"}


def load_grid(path: Path, quick: bool, section: str | None = None) -> dict[str, Any]:
    grid = yaml.safe_load(path.read_text())
    unknown = set(grid) - {
        "settings",
        "methods",
        "factors",
        "default_cells",
        "variants",
        "quick",
        "study_variants",
        "study_cells",
        "equal_compute",
        "real",  # the real-text grid: benchmarks/quality_real.py
        *SECTIONS,
    }
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    settings = dict(grid["settings"])
    if section is not None:
        if section not in SECTIONS or section not in grid:
            raise ValueError(f"--section: {section!r} is not a section of {path} (known: {', '.join(SECTIONS)})")
        sec = grid[section]
        bad_keys = set(sec) - SECTION_KEYS
        if bad_keys:
            raise ValueError(f"{path}: {section}: unknown keys {sorted(bad_keys)}")
        for key, value in (sec.get("settings") or {}).items():  # one level deep: optimizer: {name: muon, ...}
            settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings else value
        grid = {
            **grid,
            "default_cells": sec["cells"],
            "methods": sec["methods"],
            "variants": sec.get("variants", {}),
            "seed_blocks": sec.get("seed_blocks"),
        }
    if quick:
        q = grid["quick"]
        settings.update({k: v for k, v in q["settings"].items()})
        grid = {
            **grid,
            "default_cells": q["cells"],
            "methods": q["methods"] if section is None else grid["methods"],
            "seed_blocks": None,
        }
        if "equal_compute" in q:
            grid["equal_compute"] = {**grid.get("equal_compute", {}), **q["equal_compute"]}
    names = {f.name for f in fields(Settings)}
    bad = set(settings) - names
    if bad:
        raise ValueError(f"{path}: settings: unknown keys {sorted(bad)}")
    grid["settings_obj"] = Settings(**settings)
    return grid


def all_cells(grid: dict[str, Any]) -> dict[str, Cell]:
    f = grid["factors"]
    cells = [
        Cell(t, c, like, k)
        for t, c, like, k in product(f["target_fraction"], f["corrupted_fraction"], f["lookalike"], f["budget"])
    ]
    return {c.name: c for c in cells}


def pick_cells(grid: dict[str, Any], spec: str, quick: bool) -> list[Cell]:
    known = all_cells(grid)
    if quick:  # the quick cell need not be in the factors
        return [_parse_cell(n) for n in grid["default_cells"]]
    names = {"default": grid["default_cells"], "all": list(known), "study": grid.get("study_cells", [])}.get(
        spec, spec.split(",")
    )
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"--cells: unknown cells {missing}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _parse_cell(name: str) -> Cell:
    t, c, like, k = name.split("-")
    return Cell(int(t[1:]) / 100, int(c[1:]) / 100, {"h": "heavy", "a": "absent"}[like[1:]], int(k[1:]))


def methods_to_run(grid: dict[str, Any], methods: str | None, variants: str | None) -> list[tuple[str, str, dict]]:
    """(label, registry method, options) in order: the grid's methods, then the requested variants."""
    out = [(m, m, {}) for m in (methods.split(",") if methods else grid["methods"])]
    if variants:
        table = grid["variants"]
        names = {"all": list(table), "study": grid.get("study_variants", [])}.get(variants, variants.split(","))
        missing = [n for n in names if n not in table]
        if missing:
            raise SystemExit(f"--variants: unknown {missing}; known: {', '.join(table)}")
        out += [(n, table[n]["method"], dict(table[n].get("options") or {})) for n in names]
    return out


def seed_blocks(grid: dict[str, Any], settings: Settings) -> list[list[int]]:
    """The run order's seed blocks: every cell runs block 1's seeds (cell by cell), then block 2's, ... (a
    section's ``seed_blocks``, e.g. [[0, 1], [2, 3, 4]]: what fits first when a grid cannot finish);
    default one block, all seeds."""
    blocks = grid.get("seed_blocks") or [list(settings.seeds)]
    flat = [s for b in blocks for s in b]
    if sorted(flat) != sorted(settings.seeds):
        raise ValueError(f"seed_blocks: {blocks} must hold every seed of settings.seeds {settings.seeds} once")
    return [list(b) for b in blocks]


def _key(settings: Settings, cell: Cell, label: str, method: str, options: dict, seed: int) -> str:
    budget = settings.pool if method == "full" else cell.budget
    blob = json.dumps(
        [asdict(settings), asdict(cell), method, resolved_options(method, options, budget), seed],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _job(args: tuple) -> list[dict]:
    """One (cell, seed): every requested method, reusing finished runs. Runs in a worker process."""
    settings, base, cell, seed, todo, run_dir, report_only = args
    import torch

    torch.set_num_threads(1)
    logging.getLogger("optsel").setLevel(logging.WARNING)
    stream = None
    out = []
    for label, method, options in todo:
        path = Path(run_dir) / cell.name / f"{label}_s{seed}_{_key(settings, cell, label, method, options, seed)}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
            continue
        if report_only:
            continue
        if stream is None:
            stream = build_stream(
                settings,
                synthetic_config(
                    settings, cell.target_fraction, cell.corrupted_fraction, cell.lookalike, settings.num_train
                ),
                settings.stream_seed,
            )
        r = run(settings, stream, base, method, options, label, cell, seed, probe_alignment=method in PROBED)
        record = vars(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(jsonio.dumps(record))  # strict JSON: null, never NaN
        tmp.replace(path)
        print(
            f"[quality] {cell.name} {label:18s} seed {seed}: loss {r.final_loss:.4f} EM {r.final_em:.3f} "
            f"target w {r.precision.get('target', 0):.2f} corrupted w {r.precision.get('corrupted', 0):.2f} "
            f"ESS {r.ess:.1f} ({r.wall_seconds:.1f}s)",
            flush=True,
        )
        out.append(record)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (the grid file's quick block)")
    parser.add_argument("--grid", default=str(GRID_FILE), help="grid file (default: benchmarks/quality_grid.yaml)")
    parser.add_argument(
        "--section",
        default=None,
        choices=SECTIONS,
        help="a grid-file section (muon: the Muon grid) replacing settings overrides, cells, methods, "
        "variants and the run order",
    )
    parser.add_argument(
        "--cells",
        default="default",
        help="default | all | study | comma-separated cell names | real (the real-text grid, benchmarks/quality_real.py)",
    )
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the grid's)")
    parser.add_argument("--variants", default=None, help="FTW variants from the grid file: all | study | a,b")
    parser.add_argument("--workers", type=int, default=2, help="parallel (cell, seed) jobs, one thread each")
    parser.add_argument("--out", default=None, help="default: results/quality (quick: results/quality_quick)")
    parser.add_argument("--fresh", action="store_true", help="rerun even where a finished run is stored")
    parser.add_argument(
        "--equal-compute",
        action="store_true",
        help="the equal-compute view (benchmarks/quality_compute.py): every method on the FLOP budget "
        "of the grid file's equal_compute.budget_method run",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no new runs: the report over the stored runs of these cells, methods and variants",
    )
    args = parser.parse_args(argv)
    if args.cells == "real":  # the real-text grid: its own section of the grid file
        from benchmarks import quality_real  # noqa: PLC0415 - reads the stdlib corpus and needs rouge-score

        args.argv = list(sys.argv[1:] if argv is None else argv)
        return quality_real.main(args)
    started = time.perf_counter()
    grid = load_grid(Path(args.grid), args.quick, args.section)
    settings: Settings = grid["settings_obj"]
    cells = pick_cells(grid, args.cells, args.quick)
    spec = grid.get("equal_compute", {})
    todo = methods_to_run(
        grid, args.methods or (",".join(spec["methods"]) if args.equal_compute else None), args.variants
    )
    if args.equal_compute:
        if spec.get("budget_method") not in {label for label, _, _ in todo} or "random" not in {m for _, m, _ in todo}:
            raise SystemExit("--equal-compute: the methods must include random and equal_compute.budget_method")
    elif not {"random", "oracle"} <= {m for _, m, _ in todo}:
        raise SystemExit("--methods: random and oracle are needed for the gap closed")
    default_out = "results/quality_compute" if args.equal_compute else "results/quality"
    out = Path(args.out or (default_out + "_quick" if args.quick else default_out))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "runs"
    if args.fresh:
        run_dir = out / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"

    import torch

    torch.set_num_threads(1)
    logging.getLogger("optsel").setLevel(logging.WARNING)
    base_path = out / "base_model.pt"
    base_key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = torch.load(base_path, weights_only=True) if base_path.is_file() else None
    if cached is not None and cached.get("key") == base_key:
        base = cached["state"]
    else:
        t0 = time.perf_counter()
        base = pretrain(settings)
        print(f"[quality] base model pre-trained in {time.perf_counter() - t0:.1f}s", flush=True)
        tmp = base_path.with_suffix(".tmp")
        torch.save({"key": base_key, "state": base}, tmp)
        tmp.replace(base_path)
    if args.equal_compute:
        return _equal_compute(args, argv, grid, settings, cells, todo, base, out, run_dir, started)
    jobs = [
        (settings, base, cell, seed, todo, str(run_dir), args.report_only)
        for block in seed_blocks(grid, settings)
        for cell in cells
        for seed in block
    ]
    if args.workers > 1:
        # a worker killed (e.g. out of memory) fails the grid with BrokenProcessPool instead of a hang (a
        # multiprocessing.Pool waits forever for it); what finished is stored and reused by the next call
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            records = [r for batch in pool.map(_job, jobs) for r in batch]
    else:
        records = [r for job in jobs for r in _job(job)]
    runs = [RunResult.from_record(d) for d in records]
    summaries = [report.cell_summary(c.name, [r for r in runs if r.cell == c.name]) for c in cells]
    from optsel.pipeline.data.synthetic import look_alike

    meta = {
        "mode": ("quick" if args.quick else "default") + (f", section {args.section}" if args.section else ""),
        "wall_seconds": time.perf_counter() - started,
        "run_seconds": sum(r.wall_seconds for r in runs),
        "workers": args.workers,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "grid_file": str(Path(args.grid).resolve().relative_to(Path(__file__).resolve().parents[1]))
        if Path(args.grid).resolve().is_relative_to(Path(__file__).resolve().parents[1])
        else args.grid,
        "settings": asdict(settings),
        "cells": [c.name for c in cells],
        "methods": [{"label": label, "method": m, "options": o} for label, m, o in todo],
        "lookalike_kind": f"distractor/{look_alike(settings.target_task)}",
        "description": (
            f"Target task `{settings.target_task}`; N = {settings.pool}, {settings.steps} steps, "
            f"seeds {settings.seeds}; base pre-trained {settings.pretrain_steps} steps (AdamW); "
            f"fine-tuned with optimizer {settings.optimizer.get('name', 'adamw')}."
        ),
    }
    report.write_csv(runs, out / "runs.csv")
    report.write_json(runs, summaries, meta, out / "summary.json")
    table = report.alignment_by_kind(runs)
    extra = (
        (
            "\n## FTW's alignment b by kind along training\n\nMean b of each kind's pool samples in units of "
            "the step's mean |b|, mean ± 95 % CI over FTW's runs in these cells:\n\n" + report.alignment_markdown(table)
        )
        if table
        else ""
    )
    if args.section == "muon":  # the grid file's decision rule and exactly which runs the summary holds
        decision = report.muon_decision(summaries)
        extra = (
            "\n## Decision rule (benchmarks/quality_grid.yaml, `muon`)\n\n"
            + report.muon_decision_markdown(decision)
            + "\n## Runs held (seeds per cell and method)\n\n"
            + report.coverage_markdown(runs, meta["cells"])
            + extra
        )
        summary = json.loads((out / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps({**summary, "decision": decision}, indent=1, allow_nan=False))
    (out / "summary.md").write_text(report.markdown(summaries, meta) + extra)
    main_cell = "t15-c25-lh-k8" if "t15-c25-lh-k8" in meta["cells"] else meta["cells"][0]
    report.plots(runs, summaries, main_cell, out)
    print((out / "summary.md").read_text().split("## Per cell")[0])
    return {"overall": report.overall(summaries), "cells": summaries}


def _equal_compute(
    args, argv, grid, settings: Settings, cells: list[Cell], todo, base, out: Path, run_dir: Path, started: float
) -> dict:
    from benchmarks import quality_compute as compute

    spec = grid["equal_compute"]
    jobs = [
        (settings, base, cell, seed, todo, spec["budget_method"], spec, str(run_dir))
        for cell in cells
        for seed in settings.seeds
    ]
    if args.workers > 1:  # as above: a killed worker fails the grid, it does not hang it
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            records = [r for batch in pool.map(compute.job, jobs) for r in batch]
    else:
        records = [r for job in jobs for r in compute.job(job)]
    names = [c.name for c in cells]
    summaries = compute.summarize(records, names, spec["budget_method"])
    meta = {
        "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.perf_counter() - started,
        "grid_file": "benchmarks/quality_grid.yaml",
        "equal_compute": spec,
        "description": (
            f"Budget: the counted FLOPs of `{spec['budget_method']}`'s {settings.steps}-step run per cell "
            f"and seed; every other method runs round(budget / its FLOPs per step) steps (calibrated "
            f"on {spec['calibration_steps']} counted steps; a learned score without stage 2, whose labelling and "
            f"scored steps differ, on one of each, and the step count whose scheduled FLOPs come nearest the budget) "
            f"on a stream {spec['stream_factor']}× the equal-samples one; N = {settings.pool}, seeds {settings.seeds}."
        ),
    }
    (out / "summary.json").write_text(jsonio.dumps({"meta": meta, "cells": summaries}, indent=2))
    (out / "summary.md").write_text(compute.markdown(summaries, meta))
    compute.plot(records, names, out / "loss_vs_flops.png")
    print((out / "summary.md").read_text())
    return {"cells": summaries}


if __name__ == "__main__":
    main()
