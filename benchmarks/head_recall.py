"""Does the output layer's score find what exact FTW picks? Along one-stage FTW's own fine-tuning on a quality-grid
cell, at every step: the Spearman correlation of stage 1's head alignment b_head with the exact b over all
covered layers, and the share of exact FTW's chosen samples (and of its weight) that the head filter's top m
keeps (the survivors two-stage FTW would hand to stage 2).

    python -m benchmarks.head_recall [--cell t15-c25-lh-k8] [--seeds 0,1] [--m 16] [--out results/head_recall]

Settings are the grid file's (benchmarks/quality_grid.yaml); fixed before any run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.quality import GRID_FILE, _parse_cell, load_grid
from benchmarks.quality_runs import (
    OptimizerConfig,
    _optimizer,
    _train_on,
    build_selector,
    build_stream,
    new_model,
    pretrain,
    synthetic_config,
    take,
)
from benchmarks.sketch_alignment import spearman
from optsel.pipeline.files import jsonio


def trace(cell_name: str, seed: int, m: int, steps: int | None = None) -> list[dict]:
    """Per step: spearman(b_head, b_exact), recall of the chosen set and of its weight in the head's top m."""
    grid = load_grid(GRID_FILE, False)
    settings, cell = grid["settings_obj"], _parse_cell(cell_name)
    stream = build_stream(
        settings,
        synthetic_config(settings, cell.target_fraction, cell.corrupted_fraction, cell.lookalike, settings.num_train),
        settings.stream_seed,
    )
    torch.manual_seed(seed)
    model = new_model(settings)
    model.load_state_dict(pretrain(settings))
    opt_cfg = OptimizerConfig(**settings.optimizer)
    optimizer = _optimizer(model, opt_cfg)
    exact = build_selector("ftw", {"prefilter": "none"}, model, optimizer, cell.budget, seed, stream.kind_names)
    head = build_selector(
        "ftw",
        {"prefilter": "head", "prefilter_stage2": "head", "filter_size": m},
        model,
        optimizer,
        cell.budget,
        seed,
        stream.kind_names,
    )
    n, total = settings.pool, steps or settings.steps
    order = torch.randperm(stream.train["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
    out = []
    for step in range(total):
        pool = take(stream.train, order[step * n : (step + 1) * n])
        sel = exact.select(pool, stream.target)
        scored = head.select(pool, stream.target)  # its own step counter only; the model is not trained by it
        top = set(torch.sort(scored.utility, descending=True, stable=True).indices[:m].tolist())
        chosen = sel.indices.tolist()
        kept_w = sum(float(w) for i, w in zip(chosen, sel.weights) if i in top)
        out.append(
            {
                "step": step,
                "spearman": spearman(scored.alignment.double(), sel.alignment.double()),
                "recall": sum(i in top for i in chosen) / max(len(chosen), 1),
                "weight_recall": kept_w,
            }
        )
        _train_on(
            model,
            optimizer,
            take(pool, sel.indices),
            sel.weights.float(),
            opt_cfg,
            step,
            total,
            sel.pool_pass,
            sel.indices,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="t15-c25-lh-k8")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--m", type=int, default=16, help="the head filter's survivors (ftw_head's 2k)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="results/head_recall")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {int(s): trace(args.cell, int(s), args.m, args.steps) for s in args.seeds.split(",")}
    quarters = {}
    for trc in rows.values():
        q = max(1, len(trc) // 4)
        for i in range(0, len(trc), q):
            part = trc[i : i + q]
            key = f"{part[0]['step']}-{part[-1]['step']}"
            for name in ("spearman", "recall", "weight_recall"):
                quarters.setdefault(key, {}).setdefault(name, []).extend(r[name] for r in part)
    lines = [
        "# Head filter against exact FTW",
        "",
        f"Command: `python -m benchmarks.head_recall {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cell {args.cell}, seeds {args.seeds}, head top m = "
        f"{args.m}, along one-stage FTW's own fine-tuning (means over steps and seeds).",
        "",
        "| steps | Spearman(b_head, b_exact) | share of FTW's chosen in the head's top m | share of FTW's weight |",
        "|---|---|---|---|",
    ]
    for key, vals in quarters.items():
        lines.append(
            f"| {key} | {statistics.mean(vals['spearman']):.3f} | {statistics.mean(vals['recall']):.3f} | "
            f"{statistics.mean(vals['weight_recall']):.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_recall.json").write_text(jsonio.dumps({"rows": rows}, indent=2))
    (out / "head_recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
