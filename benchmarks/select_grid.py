"""FTW ``select`` per-phase time on a grid of pool sizes N and sequence lengths T, for each Gram
backend, and the sketch backend's error against the exact Gram as the sketch grows.

    python -m benchmarks.select_grid [--quick] [--device cpu|cuda] [--out results/select_grid]

Model and pools as in benchmarks/speed.py (demo-sized tiny Llama with AdamW state, random token
pools, right padding). k = N/4, filter_ratio 0.5 (FTW defaults), capture in chunks of 16 samples.
Phases are FTW's own ``Selection.timings`` (capture, target, alignment, filter, gather, gram,
solve); one warm-up select per cell, then the mean of ``repeats`` selects.

Sketch error: on one pool, K from gram="sketch" with k_o = k_i = s against K from gram="exact"
(both over the same filtered set, rows put back in pool order): relative Frobenius error, mean
over seeds, and Spearman correlation of the filtered utility (which the sketch does not touch, so
it is 1 — printed as a check) and of the QP weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed import build_model, make_pool, sync, train_step
from optsel.pipeline.files import jsonio
from optsel.selection.ftw import FilterThenWeight, FTWConfig

PHASES = ("capture", "target", "alignment", "filter", "gather", "gram", "solve")
BACKENDS = ("exact", "ghost", "sketch")


def prepared(device: torch.device, max_pos: int):
    model = build_model(device, max_pos=max_pos)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(3):  # optimizer state exists, step > 0
        train_step(model, opt, make_pool(8, 64, 1000 + s, device), torch.full((8,), 1 / 8, device=device))
    return model, opt


def grid(device, sizes, lengths, repeats) -> list[dict]:
    model, opt = prepared(device, max(lengths))
    rows = []
    for T in lengths:
        target = make_pool(8, T, 12, device)
        for n in sizes:
            pool = make_pool(n, T, 11, device)
            for gram in BACKENDS:
                cfg = FTWConfig(budget=max(1, n // 4), gram=gram, capture_chunk_size=16)
                sel = FilterThenWeight(model, opt, cfg)
                phases = {p: [] for p in PHASES}
                totals = []
                for r in range(repeats + 1):
                    sync(device)
                    t0 = time.perf_counter()
                    out = sel.select(pool, target)
                    sync(device)
                    if r:
                        totals.append(time.perf_counter() - t0)
                        for p in PHASES:
                            phases[p].append(out.timings.get(p, 0.0))
                row = {
                    "N": n,
                    "T": T,
                    "gram": gram,
                    "m": int(out.filtered.numel()),
                    "k": cfg.budget,
                    "total_s": statistics.mean(totals),
                    "phases_s": {p: statistics.mean(v) for p, v in phases.items()},
                }
                rows.append(row)
                print(
                    f"[grid] N={n:4d} T={T:4d} {gram:6s} select {row['total_s']:.3f} s "
                    + " ".join(f"{p}={row['phases_s'][p]:.3f}" for p in PHASES),
                    flush=True,
                )
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def sketch_errors(device, n, T, dims, seeds) -> list[dict]:
    model, opt = prepared(device, T)
    pool, target = make_pool(n, T, 21, device), make_pool(8, T, 22, device)
    k = max(1, n // 4)

    def in_pool_order(sel):
        order = sel.filtered.argsort()
        return sel.gram[order][:, order], sel.filtered[order]

    exact = FilterThenWeight(model, opt, FTWConfig(budget=k, gram="exact", compute_dtype="float64")).select(
        pool, target
    )
    K_exact, _ = in_pool_order(exact)
    w_exact = torch.zeros(n, dtype=torch.float64)
    w_exact[exact.local_indices.cpu()] = exact.local_weights.cpu().double()
    rows = []
    for dim in dims:
        errs, rho_w = [], []
        for seed in range(seeds):
            cfg = FTWConfig(budget=k, gram="sketch", sketch_dim_out=dim, sketch_dim_in=dim, compute_dtype="float64")
            s = FilterThenWeight(model, opt, cfg, seed=seed).select(pool, target)
            K, _ = in_pool_order(s)
            errs.append(_rel(K, K_exact))
            w = torch.zeros(n, dtype=torch.float64)
            w[s.local_indices.cpu()] = s.local_weights.cpu().double()
            rho_w.append(_spearman(w, w_exact))
        row = {
            "sketch_dim": dim,
            "rel_frob_err_mean": statistics.mean(errs),
            "rel_frob_err_std": statistics.pstdev(errs),
            "spearman_weights": statistics.mean(rho_w),
        }
        rows.append(row)
        print(
            f"[sketch] k_o=k_i={dim:4d} rel err {row['rel_frob_err_mean']:.4f} ± {row['rel_frob_err_std']:.4f} "
            f"Spearman(w, w_exact) {row['spearman_weights']:.3f}",
            flush=True,
        )
    return rows


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_grid.json").write_text(jsonio.dumps(results, indent=2))
    m = results["meta"]
    lines = [
        f"# FTW select per-phase time ({m['device_name']}, torch {m['torch']}, {m['threads']} threads, {m['date']})",
        "",
        f"Command: `{m['command']}`. k = N/4, m = N/2 survivors, mean of {m['repeats']} selects after a warm-up; seconds.",
        "",
        "| N | T | gram | total | " + " | ".join(PHASES) + " |",
        "|---|---|---|---|" + "---|" * len(PHASES),
    ]
    for r in results["grid"]:
        lines.append(
            f"| {r['N']} | {r['T']} | {r['gram']} | {r['total_s']:.3f} | "
            + " | ".join(f"{r['phases_s'][p]:.3f}" for p in PHASES)
            + " |"
        )
    se = results["sketch"]
    lines += [
        "",
        f"Sketch error vs exact Gram (N = {m['sketch_N']}, T = {m['sketch_T']}, {m['sketch_seeds']} seeds, float64):",
        "",
        "| k_o = k_i | rel. Frobenius error of K (mean ± std) | Spearman(weights, exact weights) |",
        "|---|---|---|",
    ]
    for r in se:
        lines.append(
            f"| {r['sketch_dim']} | {r['rel_frob_err_mean']:.4f} ± {r['rel_frob_err_std']:.4f} | {r['spearman_weights']:.3f} |"
        )
    (out / "select_grid.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default: results/select_grid (quick: results/select_grid_quick)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        sizes, lengths, repeats, dims, seeds, sk_n, sk_t = [16], [32], 1, [8, 32], 2, 16, 32
    else:
        sizes, lengths, repeats, dims, seeds, sk_n, sk_t = [64, 256], [128, 512], 2, [4, 8, 16, 32, 64, 128], 3, 64, 128
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "date": date.today().isoformat(),
        "command": "python -m benchmarks.select_grid " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sketch_N": sk_n,
        "sketch_T": sk_t,
        "sketch_seeds": seeds,
    }
    results = {
        "meta": meta,
        "grid": grid(device, sizes, lengths, repeats),
        "sketch": sketch_errors(device, sk_n, sk_t, dims, seeds),
    }
    out = Path(args.out or ("results/select_grid_quick" if args.quick else "results/select_grid"))
    write(results, out)
    print((out / "select_grid.md").read_text())
    return results


if __name__ == "__main__":
    main()
