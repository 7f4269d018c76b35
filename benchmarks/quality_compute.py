"""The quality grid's equal-compute view (``python -m benchmarks.quality --equal-compute``).

Every method gets the same budget of counted FLOPs per run: the budget method's (the grid file's
``equal_compute.budget_method``, FTW's default) run of ``settings.steps`` steps. Per cell and paired
seed, on a stream ``stream_factor`` times the equal-samples one (so a cheaper method's extra steps see
new samples):
1. the budget method runs its steps, every step's select + train FLOPs counted
   (torch.utils.flop_counter, matmul + attention, as benchmarks/speed.py) — the budget B;
2. every other method is calibrated on ``calibration_steps`` counted steps, then runs
   round(B / its FLOPs per step) steps (capped by the stream); its FLOPs are that count × its calibrated
   FLOPs per step (counting every step would cost 1.7× the run); its learning-rate schedule spans its own
   steps, as a user with that budget would set it. A method whose steps alternate between two costs (FTW with
   ``prefilter: learned`` and ``prefilter_stage2: score``: one-stage labelling steps and scored steps) is
   calibrated on L and L + 1 counted steps (L: its learning steps), so each kind is counted apart, and runs the
   step count whose scheduled FLOPs (:func:`scheduled_flops`) come nearest B.
Reported per cell: steps, FLOPs / B, final target loss and exact match, the paired Δ to random with its
95 % CI, and loss against FLOPs (a PNG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from benchmarks import quality_report as report
from benchmarks.quality_runs import Cell, RunResult, Settings, build_stream, resolved_options, run, synthetic_config
from optsel.pipeline.files import jsonio


def _key(settings: Settings, cell: Cell, method: str, options: dict, seed: int, steps: int, factor: int) -> str:
    budget = settings.pool if method == "full" else cell.budget
    blob = json.dumps(
        [
            "equal-compute",
            dataclasses.asdict(settings),
            dataclasses.asdict(cell),
            method,
            resolved_options(method, options, budget),
            seed,
            steps,
            factor,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stored_or_run(path: Path, make) -> dict:
    """The stored run at ``path``, else ``make()``'s, stored (atomic); JSON-shaped either way."""
    if path.is_file():
        return json.loads(path.read_text())
    text = jsonio.dumps(vars(make()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return json.loads(text)


def _total(record: dict) -> float:
    """A counted run's FLOPs over all its steps (the cumulative count at its last recorded step)."""
    return float(max(float(v) for v in record["flops"].values()))


def labelling_schedule(method: str, options: dict, budget: int) -> tuple[int, int | None] | None:
    """(learning steps L, labelling period R or None) for FTW with ``prefilter: learned`` and ``prefilter_stage2:
    score``, whose steps cost either a one-stage labelling step or a scored step; None for a constant step cost."""
    from optsel.config_loader import from_mapping
    from optsel.selection.ftw_config import FTWConfig

    if method != "ftw":
        return None
    config = from_mapping(FTWConfig, {"budget": budget, **options}, f"options.{method}")
    if config.prefilter != "learned" or config.prefilter_stage2 != "score":
        return None
    return config.prefilter_learn_steps, config.prefilter_label_every


def scheduled_flops(steps: int, labelled: float, scored: float, learn: int, every: int | None) -> float:
    """FLOPs of ``steps`` steps of that schedule: the first ``learn`` steps and every ``every``-th step after them
    label (``labelled`` FLOPs each), the rest are scored (``scored`` each); as selection/ftw/learned.py counts."""
    after = max(steps - learn, 0)
    n_label = min(steps, learn) + (after // every if every else 0)
    return n_label * labelled + (steps - n_label) * scored


def job(args: tuple) -> list[dict]:
    """One (cell, seed) of the equal-compute view (module docstring); runs in a worker process."""
    settings, base, cell, seed, todo, budget_label, spec, run_dir = args
    import torch

    torch.set_num_threads(1)
    logging.getLogger("optsel").setLevel(logging.WARNING)
    factor, calib = int(spec["stream_factor"]), int(spec["calibration_steps"])
    long = dataclasses.replace(settings, num_train=settings.num_train * factor)
    stream = build_stream(
        long,
        synthetic_config(long, cell.target_fraction, cell.corrupted_fraction, cell.lookalike, long.num_train),
        long.stream_seed,
    )
    max_steps = long.num_train // long.pool
    by_label = {label: (method, options) for label, method, options in todo}
    folder = Path(run_dir) / cell.name

    def one(label: str, steps: int, count: bool = True) -> dict:
        method, options = by_label[label]
        tag = "" if count else "u"
        path = folder / f"{label}_s{seed}_n{steps}{tag}_{_key(long, cell, method, options, seed, steps, factor)}.json"
        record = _stored_or_run(
            path, lambda: run(long, stream, base, method, options, label, cell, seed, steps=steps, count_flops=count)
        )
        return record

    budget_run = one(budget_label, settings.steps)
    budget = float(budget_run["flops"][str(settings.steps)])
    out = [dict(budget_run, budget_flops=budget, capped=False, flops_per_step=budget / settings.steps)]
    for label in by_label:
        if label == budget_label:
            continue
        method, options = by_label[label]
        period = labelling_schedule(method, options, cell.budget)
        if period is None:
            probe = one(label, calib)
            per_step = _total(probe) / calib
            scheduled = lambda n, per_step=per_step: float(n) * per_step  # noqa: E731 - one step's cost, n times
        else:  # a labelling step and a scored step counted apart (module docstring)
            learn, every = period
            labelled = _total(one(label, learn)) / learn
            scored = _total(one(label, learn + 1)) - labelled * learn
            scheduled = lambda n, a=labelled, b=scored, p=period: scheduled_flops(n, a, b, *p)  # noqa: E731
        steps = min(range(1, 64 * max_steps), key=lambda n: abs(scheduled(n) - budget))
        capped = steps > max_steps
        record = one(label, min(steps, max_steps), count=False)  # counted on the calibration steps only
        record["flops"] = {step: scheduled(int(step)) for step in record["curve"]}
        per_step = scheduled(steps) / steps
        out.append(dict(record, budget_flops=budget, capped=capped, flops_per_step=per_step))
        print(
            f"[quality/compute] {cell.name} {label:14s} seed {seed}: {record['steps']} steps "
            f"({per_step / 1e6:.1f} MFLOP/step, budget {budget / 1e9:.2f} GFLOP{', capped by the stream' if capped else ''})"
            f": loss {RunResult.from_record(record).final_loss:.4f}",
            flush=True,
        )
    return out


def summarize(records: list[dict], cells: list[str], budget_label: str) -> list[dict[str, Any]]:
    """Per cell: per method steps, FLOPs / budget, final loss / EM and the paired Δ to random."""
    summaries = []
    for cell in cells:
        recs = [r for r in records if r["cell"] == cell]
        runs = {(r["method"], r["seed"]): RunResult.from_record(r) for r in recs}
        seeds = sorted({r["seed"] for r in recs})
        methods = list(dict.fromkeys(r["method"] for r in recs))
        rows = {}
        for m in methods:
            mine = [r for r in recs if r["method"] == m]
            diff = report.mean_ci(report._paired(runs, m, "random", seeds, "final_loss"))
            em_diff = report.mean_ci(report._paired(runs, m, "random", seeds, "final_em"))
            rows[m] = {
                "steps": report.mean_ci([r["steps"] for r in mine]),
                "flops_over_budget": report.mean_ci([_total(r) / r["budget_flops"] for r in mine]),
                "final_loss": report.mean_ci([runs[(m, s)].final_loss for s in seeds if (m, s) in runs]),
                "final_em": report.mean_ci([runs[(m, s)].final_em for s in seeds if (m, s) in runs]),
                "delta_vs_random": diff,
                "em_delta_vs_random": em_diff,
                "beats_random": m != "random" and math.isfinite(diff[1]) and diff[0] + diff[1] < 0,
                "capped": any(r.get("capped") for r in mine),
            }
        summaries.append({"cell": cell, "seeds": seeds, "budget_method": budget_label, "methods": rows})
    return summaries


def markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    fmt = lambda p, d=3: (  # noqa: E731
        "—"
        if not math.isfinite(p[0])
        # noqa: E731
        else (f"{p[0]:.{d}f}" if not math.isfinite(p[1]) else f"{p[0]:.{d}f} ± {p[1]:.{d}f}")
    )
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    lines = [
        "# Quality grid at equal compute",
        "",
        f"Command: `{meta['command']}` — {meta['date']}, "
        f"{meta['wall_seconds'] / 60:.1f} min wall. Grid file: `{meta['grid_file']}`.",
        "",
        meta["description"],
        "",
        "## Over the cells",
        "",
        "| method | cells where it beats random (paired 95 % CI) | mean Δ loss vs random |",
        "|---|---|---|",
    ]
    for m in methods:
        wins = sum(1 for s in summaries if s["methods"].get(m, {}).get("beats_random"))
        deltas = [s["methods"][m]["delta_vs_random"][0] for s in summaries if m in s["methods"]]
        lines.append(f"| {m} | {wins} / {len(summaries)} | {sum(deltas) / max(len(deltas), 1):+.3f} |")
    for s in summaries:
        lines += [
            "",
            f"## {s['cell']}",
            "",
            "| method | steps | FLOPs / budget | final loss | Δ vs random (95 % CI) | final EM | ΔEM vs random |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in s["methods"].items():
            mark = " ✓" if r["beats_random"] else ""
            cap = " (stream cap)" if r["capped"] else ""
            lines.append(
                f"| {m} | {r['steps'][0]:.0f}{cap} | {fmt(r['flops_over_budget'], 2)} | {fmt(r['final_loss'])} | "
                f"{fmt(r['delta_vs_random'])}{mark} | {fmt(r['final_em'], 2)} | {fmt(r['em_delta_vs_random'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], cells: list[str], path: Path) -> None:
    """Target loss against cumulative counted FLOPs, mean over seeds at each eval point, per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        recs = [r for r in records if r["cell"] == cell]
        for m in dict.fromkeys(r["method"] for r in recs):
            mine = [RunResult.from_record(r) for r in recs if r["method"] == m]
            steps = sorted(set.intersection(*[set(r.flops) for r in mine]))
            xs = [sum(r.flops[s] for r in mine) / len(mine) / 1e9 for s in steps]
            ys = [sum(r.curve[s] for r in mine) / len(mine) for s in steps]
            ax.plot(xs, ys, marker=".", label=m)
        ax.set_xlabel("counted GFLOPs (select + train)")
        ax.set_ylabel("target validation loss")
        ax.set_title(f"{cell}: equal compute")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["job", "markdown", "plot", "summarize"]
