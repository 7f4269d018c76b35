"""How well does the ``sketches`` exchange's b track the exact b as the model gets wider?

    python -m benchmarks.sketch_alignment [--quick] [--widths 128,512,1024] [--out results/sketch_alignment]

``exchange: sketches`` forms b_i = ⟨g_i, M⟩ from k_o × k_i sketches instead of the exact GEMM, which is what
brings FTW's step to ≈ 1.06× a plain step in FLOPs (``bench speed``); on the quality grid's 128-wide model it
selects as well as the exact b. A sketched inner product errs by about ‖g_i‖‖M‖ / √(k_o k_i) while b_i is
cos(g_i, M)·‖g_i‖‖M‖, so the error relative to b grows where the cosines shrink — as they tend to with
width. This measures it: for each hidden width, the quality grid's base model (its settings, pre-training
recipe and cell ``t15-c25-lh-k8``, widths scaled: heads = width/32, kv heads half, FFN 2× width) is
fine-tuned with default FTW (exact b); at every step the same pool, target, model and optimizer state also
go through FTW with ``exchange: sketches`` at each sketch size (those selections are not trained on). Per
width and sketch size: Spearman correlation of sketched vs exact b, the share of the exact filter's m
survivors (top b) that the sketched b's top m keeps, and the overlap of the chosen k samples.
Settings (widths, sketch sizes, steps, seeds) are fixed in this file before any run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.quality import GRID_FILE, load_grid
from benchmarks.quality_runs import (
    Cell,
    Settings,
    _optimizer,
    _train_on,
    build_selector,
    build_stream,
    new_model,
    pretrain,
    synthetic_config,
    take,
)
from optsel.pipeline.engines.shared import OptimizerConfig
from optsel.pipeline.files import jsonio

#: fixed 2026-11-27 before any run
WIDTHS = (128, 512, 1024)
SKETCH_DIMS = (32, 64)  # k_o = k_i; 32 is FTWConfig's default
STEPS = 30
SEEDS = (0, 1)
CELL = Cell(target_fraction=0.15, corrupted_fraction=0.25, lookalike="heavy", budget=8)


def widened(settings: Settings, width: int) -> Settings:
    heads = max(2, width // 32)
    model = {
        **settings.model,
        "hidden_size": width,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": 2 * width,
    }
    return dataclasses.replace(settings, model=model)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-300))


def top_share(exact: torch.Tensor, approx: torch.Tensor, m: int) -> float:
    keep = set(exact.topk(m).indices.tolist())
    return len(keep & set(approx.topk(m).indices.tolist())) / m


def measure(settings: Settings, width: int, dims: tuple[int, ...], steps: int, seeds: tuple[int, ...]) -> dict:
    settings = widened(settings, width)
    t0 = time.perf_counter()
    base = pretrain(settings)
    cfg = synthetic_config(settings, CELL.target_fraction, CELL.corrupted_fraction, CELL.lookalike, settings.num_train)
    stream = build_stream(settings, cfg, settings.stream_seed)
    rows: dict[int, dict[str, list[float]]] = {
        d: {"spearman": [], "filter_share": [], "chosen_share": []} for d in dims
    }
    n = settings.pool
    for seed in seeds:
        torch.manual_seed(seed)
        model = new_model(settings)
        model.load_state_dict(base)
        model.train()
        opt = OptimizerConfig(**settings.optimizer)
        optimizer = _optimizer(model, opt)
        exact = build_selector("ftw", {}, model, optimizer, CELL.budget, seed, stream.kind_names)
        sketched = {
            d: build_selector(
                "ftw",
                {"exchange": "sketches", "gram": "sketch", "sketch_dim_out": d, "sketch_dim_in": d},
                model,
                optimizer,
                CELL.budget,
                seed,
                stream.kind_names,
            )
            for d in dims
        }
        order = torch.randperm(stream.train["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
        m = exact.config.num_filtered(n)
        for step in range(steps):
            pool = take(stream.train, order[step * n : (step + 1) * n])
            sel = exact.select(pool, stream.target)
            b, chosen = sel.alignment.double(), set(sel.indices.tolist())
            for d, selector in sketched.items():
                other = selector.select(pool, stream.target)
                b_sketched = other.alignment.double()
                rows[d]["spearman"].append(spearman(b, b_sketched))
                rows[d]["filter_share"].append(top_share(b, b_sketched, m))
                rows[d]["chosen_share"].append(len(chosen & set(other.indices.tolist())) / max(len(chosen), 1))
            _train_on(
                model,
                optimizer,
                take(pool, sel.indices),
                sel.weights.float(),
                opt,
                step,
                settings.steps,
                sel.pool_pass,
                sel.indices,
            )
    out = {
        "width": width,
        "params": sum(p.numel() for p in model.parameters()),
        "m": m,
        "k": CELL.budget,
        "seconds": time.perf_counter() - t0,
        "by_dim": {},
    }
    for d, r in rows.items():
        out["by_dim"][d] = {key: {"mean": statistics.fmean(v), "min": min(v)} for key, v in r.items()}
        print(
            f"[sketch_alignment] width {width} k_o=k_i={d}: "
            + ", ".join(f"{key} {statistics.fmean(v):.3f}" for key, v in r.items()),
            flush=True,
        )
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sketch_alignment.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [
        "# Sketched b against exact b, by model width",
        "",
        f"Command: `{meta['command']}` — {meta['date']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"cell {meta['cell']}, {meta['steps']} fine-tuning steps × seeds {meta['seeds']} (every step measured), "
        f"N = {meta['N']}.",
        "",
        "Spearman: rank correlation of the sketched b with the exact b over the pool. Filter share: the "
        "share of the exact b's top m that the sketched b's top m keeps (m = the filter's survivors). "
        "Chosen share: the share of exact FTW's chosen k that sketched FTW also chooses. Means over steps "
        "(min in brackets).",
        "",
        "| width | parameters | k_o = k_i | Spearman | filter share | chosen share |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for d, r in row["by_dim"].items():
            lines.append(
                f"| {row['width']} | {row['params'] / 1e6:.1f} M | {d} | "
                + " | ".join(
                    f"{r[key]['mean']:.3f} ({r[key]['min']:.2f})"
                    for key in ("spearman", "filter_share", "chosen_share")
                )
                + " |"
            )
    (out / "sketch_alignment.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the grid's quick settings, widths 32 and 64")
    parser.add_argument("--widths", default=None, help="comma-separated hidden widths (default: WIDTHS)")
    parser.add_argument("--out", default=None, help="default: results/sketch_alignment (quick: _quick)")
    args = parser.parse_args(argv)
    grid = load_grid(GRID_FILE, args.quick)
    settings: Settings = grid["settings_obj"]
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else ((32, 64) if args.quick else WIDTHS)
    steps, seeds, dims = (3, (0,), (8,)) if args.quick else (STEPS, SEEDS, SKETCH_DIMS)
    results = {
        "meta": {
            "command": "python -m benchmarks.sketch_alignment " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cell": CELL.name,
            "steps": steps,
            "seeds": list(seeds),
            "N": settings.pool,
        },
        "rows": [measure(settings, w, dims, steps, seeds) for w in widths],
    }
    out = Path(args.out or ("results/sketch_alignment_quick" if args.quick else "results/sketch_alignment"))
    write(results, out)
    print((out / "sketch_alignment.md").read_text())
    return results


if __name__ == "__main__":
    main()
