"""Statistics, tables and plots of the quality grid.

Per cell and method, over paired seeds (the same seed gives every method the same base model, stream
order and target set): the paired difference to random of the final target loss (mean and 95 % CI,
Student t), the gap closed (L_random − L_method) / (L_random − L_oracle), exact match, precision (share
of the step's weight on each kind) and ESS. A cell is valid only when the oracle beats random with a
95 % CI that excludes zero; an invalid cell says nothing about selectors and is reported as such.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.quality_runs import RunResult


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % CI) with Student's t; half-width nan for one value."""
    from scipy import stats

    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return m, float(stats.t.ppf(0.975, len(vals) - 1)) * sd / len(vals) ** 0.5


def _paired(runs: dict[tuple[str, int], RunResult], method: str, base: str, seeds: list[int], attr: str) -> list[float]:
    return [
        getattr(runs[(method, s)], attr) - getattr(runs[(base, s)], attr)
        for s in seeds
        if (method, s) in runs and (base, s) in runs
    ]


def cell_summary(cell: str, runs: list[RunResult]) -> dict[str, Any]:
    """Everything the tables need for one cell."""
    by = {(r.method, r.seed): r for r in runs}
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = sorted({r.seed for r in runs})
    out: dict[str, Any] = {"cell": cell, "seeds": seeds, "methods": {}}
    oracle_diff = (
        mean_ci(_paired(by, "oracle", "random", seeds, "final_loss"))
        if "oracle" in methods
        else (float("nan"), float("nan"))
    )
    valid = math.isfinite(oracle_diff[1]) and oracle_diff[0] + oracle_diff[1] < 0
    out["valid"] = valid
    out["oracle_minus_random"] = oracle_diff
    for method in methods:
        rs = [by[(method, s)] for s in seeds if (method, s) in by]
        loss = mean_ci([r.final_loss for r in rs])
        # the gap closed on the method's own seeds (paired): a grid cut short holds random and the oracle on
        # more seeds than a selector, and their other seeds' losses say nothing about this method's
        both = [s for s in seeds if (method, s) in by and ("random", s) in by and ("oracle", s) in by]
        rand = mean_ci([by[("random", s)].final_loss for s in both])[0]
        orac = mean_ci([by[("oracle", s)].final_loss for s in both])[0]
        own = mean_ci([by[(method, s)].final_loss for s in both])[0]
        diff = mean_ci(_paired(by, method, "random", seeds, "final_loss"))
        em_diff = mean_ci(_paired(by, method, "random", seeds, "final_em"))
        kinds = sorted({k for r in rs for k in r.precision})
        out["methods"][method] = {
            "final_loss": loss,
            "final_em": mean_ci([r.final_em for r in rs]),
            "diff_to_random": diff,
            "em_diff_to_random": em_diff,
            "beats_random": bool(math.isfinite(diff[1]) and diff[0] + diff[1] < 0),
            "gap_closed": (rand - own) / (rand - orac) if valid and both and rand != orac else None,
            "gap_seeds": both,
            "precision": {k: sum(r.precision.get(k, 0.0) for r in rs) / len(rs) for k in kinds},
            "ess": sum(r.ess for r in rs) / len(rs),
            "selected": sum(r.selected for r in rs) / len(rs),
            "seconds": sum(r.seconds[max(r.seconds)] for r in rs) / len(rs),
            "fallbacks": {
                k: sum(r.fallbacks.get(k, 0.0) for r in rs) / len(rs)
                for k in sorted({k for r in rs for k in r.fallbacks})
            },
        }
    return out


def overall(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method over the valid cells: mean gap closed, cells where it beats random (CI), cells counted."""
    valid = [s for s in summaries if s["valid"]]
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    out = {}
    for method in methods:
        gaps = [s["methods"][method]["gap_closed"] for s in valid if method in s["methods"]]
        wins = sum(bool(s["methods"][method]["beats_random"]) for s in valid if method in s["methods"])
        out[method] = {
            "mean_gap_closed": sum(gaps) / len(gaps) if gaps else None,
            "valid_cells": len(gaps),
            "beats_random_cells": wins,
        }
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pm(pair: tuple[float, float], digits: int = 3) -> str:
    return f"{_fmt(pair[0], digits)} ± {_fmt(pair[1], digits)}"


def markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ov = overall(summaries)
    lines = [
        f"# Quality grid ({meta['mode']})",
        "",
        f"Command: `{meta['command']}` — {meta['date']}, {meta['wall_seconds'] / 60:.1f} min wall for this "
        f"invocation on 2 CPU cores; the {len(meta['cells'])} cells' runs took {meta['run_seconds'] / 60:.1f} "
        f"core-minutes in all (≈ {meta['run_seconds'] / 60 / max(meta['workers'], 1):.1f} min with "
        f"{meta['workers']} workers; stored runs are reused).",
        f"Grid file: `{meta['grid_file']}` (settings and cells fixed before results were seen).",
        "",
        meta.get("description", ""),
        "",
        "Gap closed = (L_random − L_method) / (L_random − L_oracle) of the final target validation loss, "
        "per cell; a cell is valid when the oracle beats random with a 95 % CI excluding zero. "
        "'beats random': the paired 95 % CI of L_method − L_random lies below zero.",
        "",
        "## Over the valid cells",
        "",
        "| method | mean gap closed | cells where it beats random (CI) | valid cells |",
        "|---|---|---|---|",
    ]
    for method, o in sorted(ov.items(), key=lambda kv: -(kv[1]["mean_gap_closed"] or -1e9)):
        lines.append(f"| {method} | {_fmt(o['mean_gap_closed'], 2)} | {o['beats_random_cells']} | {o['valid_cells']} |")
    lines += ["", "## Per cell", ""]
    for s in summaries:
        lines += [
            f"### {s['cell']} — {'valid' if s['valid'] else 'INVALID (oracle does not beat random)'}; "
            f"oracle − random {_pm(s['oracle_minus_random'])}",
            "",
            "| method | final loss | Δ vs random (95 % CI) | gap closed | final EM | ΔEM vs random | "
            "w on target | w on corrupted | w on look-alike | ESS | s (select+train) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, m in s["methods"].items():
            p = m["precision"]
            like = sum(v for k, v in p.items() if k == meta.get("lookalike_kind"))
            lines.append(
                f"| {method} | {_pm(m['final_loss'])} | {_pm(m['diff_to_random'])}"
                f"{' ✓' if m['beats_random'] else ''} | {_fmt(m['gap_closed'], 2)} | {_pm(m['final_em'], 2)} | "
                f"{_pm(m['em_diff_to_random'], 2)} | {_fmt(p.get('target', 0.0), 2)} | "
                f"{_fmt(p.get('corrupted', 0.0), 2)} | {_fmt(like, 2)} | {_fmt(m['ess'], 1)} | "
                f"{_fmt(m['seconds'], 1)} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def write_csv(runs: list[RunResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "method", "seed", "step", "eval_loss", "exact_match", "seconds"])
        for r in runs:
            for step in sorted(r.curve):
                w.writerow([r.cell, r.method, r.seed, step, r.curve[step], r.em_curve[step], r.seconds[step]])


def write_json(runs: list[RunResult], summaries: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    payload = {"meta": meta, "overall": overall(summaries), "cells": summaries, "runs": [vars(r) for r in runs]}
    path.write_text(json.dumps(clean(payload), indent=1, allow_nan=False))


def plots(runs: list[RunResult], summaries: list[dict[str, Any]], cell: str, out: Path) -> None:
    """loss and exact match vs step, loss vs seconds for ``cell``; gap-closed heat map of all cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in runs if r.cell == cell]
    methods = list(dict.fromkeys(r.method for r in rs))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for method in methods:
        mine = [r for r in rs if r.method == method]
        steps = sorted(set.intersection(*(set(r.curve) for r in mine)))
        loss = [sum(r.curve[s] for r in mine) / len(mine) for s in steps]
        em = [sum(r.em_curve[s] for r in mine) / len(mine) for s in steps]
        secs = [sum(r.seconds[s] for r in mine) / len(mine) for s in steps]
        style = dict(lw=2.4 if method == "ftw" else 1.3, ls="-" if method.startswith("ftw") else "--")
        axes[0].plot(steps, loss, label=method, **style)
        axes[1].plot(steps, em, label=method, **style)
        axes[2].plot(secs, loss, label=method, **style)
    axes[0].set(xlabel="step (equal samples)", ylabel="target validation loss", title=f"{cell}: loss vs step")
    axes[1].set(xlabel="step", ylabel="exact match", title="exact match vs step")
    axes[2].set(
        xlabel="seconds of select + train (equal wall-clock)",
        ylabel="target validation loss",
        title="loss vs wall-clock",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    cells = [s["cell"] for s in summaries]
    methods = [m for m in dict.fromkeys(m for s in summaries for m in s["methods"]) if m not in ("random", "oracle")]
    import numpy as np

    grid = np.full((len(methods), len(cells)), np.nan)
    for j, s in enumerate(summaries):
        for i, m in enumerate(methods):
            g = s["methods"].get(m, {}).get("gap_closed")
            if g is not None:
                grid[i, j] = g
    height = max(3.0, 1.2 + 0.42 * len(methods))  # inches; below ~3 the colorbar is shorter than its label
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cells), height))
    limit = 1.5  # the colour scale spans gap closed in [-limit, limit]; beyond it cells take the end colours
    im = ax.imshow(np.clip(grid, -limit, limit), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(
        range(len(cells)),
        [c + ("" if s["valid"] else "\n(invalid)") for c, s in zip(cells, summaries)],
        rotation=60,
        fontsize=7,
        ha="right",
    )
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    for i in range(len(methods)):
        for j in range(len(cells)):
            if np.isfinite(grid[i, j]):
                dark = abs(grid[i, j]) > 0.6 * limit  # RdBu is near-black blue/red past 0.6 of its half-range
                ax.text(
                    j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black"
                )
    fig.colorbar(im, ax=ax, label="gap closed (1 = oracle, 0 = random)")
    ax.set_title("gap closed per cell")
    fig.tight_layout()
    fig.savefig(out / "gap_closed.png", dpi=110, bbox_inches="tight")  # the colorbar label stays inside
    plt.close(fig)


def alignment_by_kind(runs: list[RunResult], method: str = "ftw") -> dict[int, dict[str, tuple[float, float]]]:
    """step -> kind -> (mean, 95 % CI) over the method's runs of the mean alignment b of that kind's pool
    samples, in units of the step's mean |b| (recorded every eval_every steps)."""
    acc: dict[int, dict[str, list[float]]] = {}
    for r in runs:
        if r.method != method:
            continue
        for step, kinds in r.alignment_by_kind.items():
            for kind, value in kinds.items():
                acc.setdefault(int(step), {}).setdefault(kind, []).append(value)
    return {s: {k: mean_ci(v) for k, v in sorted(kinds.items())} for s, kinds in sorted(acc.items())}


def alignment_markdown(table: dict[int, dict[str, tuple[float, float]]]) -> str:
    kinds = sorted({k for row in table.values() for k in row})
    lines = ["| step | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for step, row in table.items():
        lines.append(f"| {step} | " + " | ".join(_pm(row[k], 2) if k in row else "—" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def coverage_markdown(runs: list[RunResult], cells: list[str]) -> str:
    """Which seeds ran, per cell and method (a grid cut short shows exactly what it holds)."""
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = {
        (r.cell, r.method): sorted({x.seed for x in runs if x.cell == r.cell and x.method == r.method}) for r in runs
    }
    lines = ["| cell | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for cell in cells:
        lines.append(
            f"| {cell} | " + " | ".join(",".join(map(str, seeds.get((cell, m), []))) or "—" for m in methods) + " |"
        )
    return "\n".join(lines) + "\n"


def muon_decision(
    summaries: list[dict[str, Any]],
    method: str = "ftw_muon",
    controls: tuple[str, ...] = ("ftw_muon_adam", "ftw_muon_identity", "ftw_muon_lowrank"),
) -> dict[str, Any]:
    """The Muon grid's decision rule (benchmarks/quality_grid.yaml, ``muon``): over the valid cells, ``method``'s
    mean gap closed above each control's, and beating random (paired CI) in more than half of the valid cells."""
    ov = overall(summaries)
    mine = ov.get(method, {})
    gap = mine.get("mean_gap_closed")
    valid = mine.get("valid_cells", 0)
    above = {
        c: (gap is not None and ov.get(c, {}).get("mean_gap_closed") is not None and gap > ov[c]["mean_gap_closed"])
        for c in controls
    }
    wins = mine.get("beats_random_cells", 0)
    return {
        "valid_cells": valid,
        "mean_gap_closed": gap,
        "controls": {c: ov.get(c, {}).get("mean_gap_closed") for c in controls},
        "above_controls": above,
        "beats_random_cells": wins,
        "holds": bool(valid and all(above.values()) and wins > valid / 2),
    }


def muon_decision_markdown(d: dict[str, Any], method: str = "ftw_muon") -> str:
    lines = [
        f"Over {d['valid_cells']} valid cell(s): {method} mean gap closed {_fmt(d['mean_gap_closed'], 2)}; "
        + "; ".join(
            f"{c} {_fmt(v, 2)} ({method} {'above' if d['above_controls'][c] else 'NOT above'})"
            for c, v in d["controls"].items()
        )
        + f"; beats random (CI) in {d['beats_random_cells']} of {d['valid_cells']}.",
        "",
        f"**The rule {'holds' if d['holds'] else 'does not hold'}.**",
    ]
    return "\n".join(lines) + "\n"
