"""Quality benchmark (DESIGN §6): every selector at the same budget on the synthetic stream.

    python -m benchmarks.quality [--quick] [--methods a,b] [--out results/quality] [--work DIR]

A tiny Llama is first pre-trained briefly with ``full`` on a distractor-only ("general") stream
and saved; every method then fine-tunes that model on the mixed stream (clean addition = target,
corrupted additions, distractors) with the same N, k, steps, optimizer and seeds, through the real
Trainer (single process, fsdp2 engine). Reported per method, mean ± std over seeds: target
validation loss vs step, final exact match, steps to reach random's final loss, and selection
precision (share of the step's weight on clean target samples). Writes runs.csv, summary.json,
summary.md and PNG plots under --out. Settings are fixed in benchmarks/common.py (QUICK / DEFAULT)
before any result is seen; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT, QUICK, Scale, base_overrides, prepare_stream, pretrain, quiet, run_trainer

METHODS = ["random", "full", "loss", "gradnorm", "greats", "uds", "less", "ftw", "ftw_sgd", "ftw_filter_only",
           "ftw_weight_only", "ftw_sketch_exchange"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_method(method: str, seed: int, base: Path, data: Path, work: Path, scale: Scale,
               extra: list[str] | None = None) -> dict:
    overrides = base_overrides(f"{method}_s{seed}", work / "runs", data, scale, seed) + list(extra or []) + [
        f"selection.method={method}", f"selection.pool_size={scale.pool}",
        f"selection.budget={scale.pool if method == 'full' else scale.budget}",
        f"training.num_steps={scale.steps}", f"training.eval_every={scale.eval_every}",
        "model.source=local", f"model.path={base}"]
    start = time.perf_counter()
    summary, trainer = run_trainer(overrides)
    trainer.close()
    rows = read_metrics(Path(summary["run_dir"]))
    curve = {int(r["step"]): r["eval/loss"] for r in rows if r.get("eval/loss") is not None}
    em = {int(r["step"]): r["eval/exact_match"] for r in rows if r.get("eval/exact_match") is not None}
    precision = [r.get("select/precision/target", 0.0) or 0.0 for r in rows if "train/loss" in r]
    selected = [r.get("select/selected", 0.0) or 0.0 for r in rows if "train/loss" in r]
    return {"method": method, "seed": seed, "final_eval_loss": summary["final_eval_loss"],
            "final_exact_match": summary["final_exact_match"], "curve": curve, "exact_match_curve": em,
            "precision_target": sum(precision) / max(len(precision), 1),
            "selected_mean": sum(selected) / max(len(selected), 1),
            "mean_step_seconds": summary["mean_step_seconds"], "wall_seconds": time.perf_counter() - start}


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5 if len(vals) > 1 else 0.0


def aggregate(runs: list[dict], methods: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        steps = sorted(set.intersection(*(set(r["curve"]) for r in rs)))
        curve = {s: mean_std([r["curve"][s] for r in rs]) for s in steps}
        out[method] = {"seeds": [r["seed"] for r in rs], "curve": curve,
                       "final_eval_loss": mean_std([r["final_eval_loss"] for r in rs]),
                       "final_exact_match": mean_std([r["final_exact_match"] for r in rs]),
                       "precision_target": mean_std([r["precision_target"] for r in rs]),
                       "mean_step_seconds": mean_std([r["mean_step_seconds"] for r in rs])}
    if "random" in out:
        goal = out["random"]["final_eval_loss"][0]
        for agg in out.values():
            hit = [s for s, (m, _) in agg["curve"].items() if s > 0 and m <= goal]
            agg["steps_to_random_final"] = min(hit) if hit else None
    return out


def write_outputs(runs: list[dict], agg: dict[str, dict], out: Path, scale: Scale, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", "eval_loss", "eval_exact_match"])
        for r in runs:
            for s, loss in sorted(r["curve"].items()):
                w.writerow([r["method"], r["seed"], s, loss, r["exact_match_curve"].get(s)])
    (out / "summary.json").write_text(json.dumps({"settings": scale.__dict__, "meta": meta, "methods": agg,
                                                   "runs": runs}, indent=2, default=str))
    lines = [f"# Quality benchmark ({meta['mode']})", "",
             f"Command: `{meta.get('command', 'python -m benchmarks.quality')}` — {meta.get('date', '')}, "
             f"{meta.get('wall_seconds', 0) / 60:.1f} min wall on 2 CPU cores (shared).", "",
             f"N = {scale.pool} candidates/step, k = {scale.budget} (full: all N), {scale.steps} steps, "
             f"seeds {list(scale.seeds)}; base model pre-trained {scale.pretrain_steps} steps on distractors only.",
             "Mean ± std over seeds. Precision: share of the step's weight on clean target samples.", "",
             "Selected: mean number of samples with non-zero weight per step (budget k).", "",
             "| method | final target val loss | final exact match | steps to random's final loss | precision (target) | selected | s/step |",
             "|---|---|---|---|---|---|---|"]
    for method, a in agg.items():
        fl, em, pr, st = a["final_eval_loss"], a["final_exact_match"], a["precision_target"], a["mean_step_seconds"]
        lines.append(f"| {method} | {fl[0]:.4f} ± {fl[1]:.4f} | {em[0]:.3f} ± {em[1]:.3f} | "
                     f"{a.get('steps_to_random_final') if a.get('steps_to_random_final') is not None else '—'} | "
                     f"{pr[0]:.3f} ± {pr[1]:.3f} | {meta.get('selected_per_step', {}).get(method, float('nan')):.1f} | "
                     f"{st[0]:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(agg, out)


def plot(agg: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, a in agg.items():
        steps = sorted(a["curve"])
        m = [a["curve"][s][0] for s in steps]
        sd = [a["curve"][s][1] for s in steps]
        style = "-" if method.startswith("ftw") else "--"
        ax.plot(steps, m, style, label=method, lw=2.2 if method == "ftw" else 1.2)
        ax.fill_between(steps, [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)], alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("target validation loss")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "eval_loss.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(agg)
    ax.bar(names, [agg[n]["final_exact_match"][0] for n in names], yerr=[agg[n]["final_exact_match"][1] for n in names])
    ax.set_ylabel("final exact match")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "exact_match.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None, help="default: results/quality (quick: results/quality_quick)")
    parser.add_argument("--work", default=None, help="scratch dir for streams, base model and runs (default: temp)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every run (e.g. selection.options.ftw.w_max=0.125); for "
                             "diagnostic variants written to their own --out, never for the committed default table")
    args = parser.parse_args(argv)
    quiet()
    scale = QUICK if args.quick else DEFAULT
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out or ("results/quality_quick" if args.quick else "results/quality"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="optsel_quality_"))
    started = time.perf_counter()
    base = pretrain(work, scale)
    data = prepare_stream(work / "data_mixed", scale.num_train, scale.num_val, 0.4, 0.2, seed=0)
    runs = []
    for seed in scale.seeds:
        for method in methods:
            r = run_method(method, seed, base, data, work, scale, args.set)
            print(f"[quality] {method:16s} seed {seed}: final loss {r['final_eval_loss']:.4f} "
                  f"EM {r['final_exact_match']:.3f} precision {r['precision_target']:.3f} "
                  f"({r['wall_seconds']:.1f}s)", flush=True)
            runs.append(r)
    agg = aggregate(runs, methods)
    meta = {"mode": "quick" if args.quick else "default", "wall_seconds": time.perf_counter() - started,
            "work_dir": str(work), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
            "overrides": list(args.set),
            "selected_per_step": {m: mean_std([r["selected_mean"] for r in runs if r["method"] == m])[0] for m in methods}}
    write_outputs(runs, agg, out, scale, meta)
    print((out / "summary.md").read_text())
    return agg


if __name__ == "__main__":
    main()
