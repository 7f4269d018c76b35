"""``optsel compare RUN_DIR RUN_DIR ... [--plot PNG]``: runs side by side (the demo's random vs FTW).

Reads each run folder's ``summary.json`` (initial/final target validation loss and exact match, steps,
step time) and ``metrics.jsonl`` (the target validation loss at every evaluation), prints one table row
per run with the final loss's difference to the first run, and optionally writes one PNG with every run's
target-loss curve. Runs that differ in steps, pool or budget are compared anyway, with a note saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SUMMARY_KEYS = (
    "method",
    "num_steps",
    "pool_size",
    "budget",
    "initial_eval_loss",
    "final_eval_loss",
    "initial_exact_match",
    "final_exact_match",
    "mean_step_seconds",
)


@dataclass(frozen=True)
class RunOutcome:
    """One run's numbers: losses in nats/token on the held-out target set, exact match in [0, 1]."""

    name: str  #: the run folder's name
    method: str
    num_steps: int
    pool_size: int
    budget: int
    initial_loss: float
    final_loss: float
    initial_exact_match: float
    final_exact_match: float
    mean_step_seconds: float
    curve: tuple[tuple[int, float], ...]  #: (step, target validation loss) at each evaluation, step 0 first


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def read_run(run_dir: Path) -> RunOutcome:
    """A finished run's outcome from ``run_dir``/summary.json and metrics.jsonl (errors name the file)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (not a finished run folder?)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    missing = [k for k in _SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    curve: list[tuple[int, float]] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{metrics}:{lineno}: not JSON ({err.msg})") from None
            if isinstance(record, dict) and "eval/loss" in record and "step" in record:
                curve.append((int(record["step"]), _number(record["eval/loss"])))
    return RunOutcome(
        name=run_dir.name,
        method=str(summary["method"]),
        num_steps=int(summary["num_steps"]),
        pool_size=int(summary["pool_size"]),
        budget=int(summary["budget"]),
        initial_loss=_number(summary["initial_eval_loss"]),
        final_loss=_number(summary["final_eval_loss"]),
        initial_exact_match=_number(summary["initial_exact_match"]),
        final_exact_match=_number(summary["final_exact_match"]),
        mean_step_seconds=_number(summary["mean_step_seconds"]),
        curve=tuple(curve),
    )


def table(runs: list[RunOutcome]) -> str:
    """A markdown table, one row per run; Δ is the final target loss minus the first run's."""
    lines = [
        "| run | method | steps | N → k | target loss (start → final) | Δ final loss vs first run "
        "| exact match (start → final) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = runs[0].final_loss
    for r in runs:
        delta = "—" if r is runs[0] else f"{r.final_loss - base:+.3f}"
        lines.append(
            f"| {r.name} | {r.method} | {r.num_steps} | {r.pool_size} → {r.budget} "
            f"| {r.initial_loss:.3f} → **{r.final_loss:.3f}** | {delta} "
            f"| {r.initial_exact_match:.2f} → **{r.final_exact_match:.2f}** | {r.mean_step_seconds:.2f} |"
        )
    return "\n".join(lines)


def notes(runs: list[RunOutcome]) -> list[str]:
    """Why the rows may not be comparable (different steps, pool or budget)."""
    out = []
    for key in ("num_steps", "pool_size", "budget"):
        values = {getattr(r, key) for r in runs}
        if len(values) > 1:
            out.append(f"note: the runs differ in {key} ({', '.join(f'{r.name}={getattr(r, key)}' for r in runs)})")
    return out


def plot(runs: list[RunOutcome], path: Path) -> Path:
    """Every run's target validation loss against the optimizer step, on one PNG at ``path``."""
    import matplotlib  # noqa: PLC0415 - heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy: imported when a plot is drawn

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for r in runs:
        points = [(s, v) for s, v in r.curve if not math.isnan(v)]
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            "o-",
            lw=1.5,
            label=f"{r.method} ({r.name}): final {r.final_loss:.3f}, EM {r.final_exact_match:.2f}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target validation loss (nats/token)")
    ax.set_title("target validation loss, same stream and seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="optsel compare",
        description="Finished runs side by side: final target "
        "validation loss and exact match (from summary.json and metrics.jsonl).",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (e.g. runs/demo-deepspeed-random)")
    parser.add_argument("--plot", type=Path, help="write every run's target-loss curve to this PNG")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.run_dirs]
    except (OSError, ValueError) as err:
        print(f"optsel compare: {err}", file=sys.stderr)
        return 2
    print(table(runs))
    for line in notes(runs):
        print(line)
    if args.plot is not None:
        print(f"plot: {plot(runs, args.plot)}")
    return 0
