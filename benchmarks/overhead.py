"""Overhead benchmark: each method's step / a plain training step on the k samples it trains on.

    python -m benchmarks.overhead [--quick] [--sizes cpu-compute,small] [--ratios 2,4,8] [--out results/overhead]

The reference a user feels is the step they run anyway: forward + backward + AdamW on k samples (what
random selection costs). For each model size and N/k in ``--ratios`` (k fixed, N = ratio·k, |V| = k
target rows, the speed benchmark's pools: random tokens, lengths T/2..T, the first 4 tokens prompt), every
method's step (select + train on its chosen rows + AdamW) is timed in interleaved rounds (plain-k,
every method in an order rotated per round, plain-k again; a method's ratio is the median over rounds of
its step / that round's mean plain-k step) and counted in FLOPs (matmul + attention,
torch.utils.flop_counter, one step after the rounds). The old reference, a plain step over all N, is
printed beside it, and so is what selection/cost_model.py's ``step_flops`` predicts for each FTW
variant (docs/design.md#two-stage's formulas; random is 1 by definition). The methods and the two-stage FTW
variants are fixed below (written before any run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed import (
    SIZES,
    VOCAB,
    Method,
    build_model,
    count_flops,
    interleaved_rounds,
    make_pool,
    sync,
    train_step,
)
from optsel.pipeline.files import jsonio
from optsel.selection.cost_model import StepShape, head_share, step_flops
from optsel.selection.ftw_config import FTWConfig

#: (label, method, FTW options or a callable of (k, T) giving them); written 2026-12-02 before any run
VARIANTS = [
    ("random", "random", None),
    ("greats", "greats", None),
    ("less", "less", None),
    ("ftw (one stage, exact b)", "ftw", {}),
    ("ftw[head, m=2k]", "ftw", lambda k, T: {"prefilter": "head", "filter_size": 2 * k}),
    ("ftw[head, m=k]", "ftw", lambda k, T: {"prefilter": "head", "filter_size": k}),
    (
        "ftw[head, m=2k, W=T/4]",
        "ftw",
        lambda k, T: {"prefilter": "head", "filter_size": 2 * k, "prefilter_window": T // 4},
    ),
    ("ftw[head, m=k, W=T/4]", "ftw", lambda k, T: {"prefilter": "head", "filter_size": k, "prefilter_window": T // 4}),
    (
        "ftw[head, m=k, W=T/4, reuse]",
        "ftw",
        lambda k, T: {"prefilter": "head", "filter_size": k, "prefilter_window": T // 4, "prefilter_target": "reuse"},
    ),
    (
        "ftw[head, m=k, W=T/4, reuse, refresh 4]",
        "ftw",
        lambda k, T: {
            "prefilter": "head",
            "filter_size": k,
            "prefilter_window": T // 4,
            "prefilter_target": "reuse",
            "target_refresh": 4,
        },
    ),
    # stage 2 on the head alone: the QP on the head's b and K, the trainer's own step on the chosen k
    ("ftw[head only]", "ftw", lambda k, T: {"prefilter": "head", "prefilter_stage2": "head"}),
    (
        "ftw[head only, W=T/4]",
        "ftw",
        lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_window": T // 4},
    ),
    (
        "ftw[head only, W=T/8]",
        "ftw",
        lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_window": T // 8},
    ),
    # the early-exit proxy (prefilter_depth L of the size's 4 blocks); added 2026-12-02 23:45 UTC before any run
    ("ftw[head, m=k, exit L=0]", "ftw", lambda k, T: {"prefilter": "head", "filter_size": k, "prefilter_depth": 0}),
    (
        "ftw[head only, exit L=1]",
        "ftw",
        lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_depth": 1},
    ),
    (
        "ftw[head only, exit L=0]",
        "ftw",
        lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_depth": 0},
    ),
    (
        "ftw[head only, exit L=0, |V|/4 rows]",
        "ftw",
        lambda k, T: {
            "prefilter": "head",
            "prefilter_stage2": "head",
            "prefilter_depth": 0,
            "prefilter_target_rows": max(1, k // 4),
        },
    ),
    (
        "ftw[head only, W=T/8, |V|/4 rows]",
        "ftw",
        lambda k, T: {
            "prefilter": "head",
            "prefilter_stage2": "head",
            "prefilter_window": T // 8,
            "prefilter_target_rows": max(1, k // 4),
        },
    ),
    # the learned stage 1 (no model in stage 1; exact stage 2 on m); added 2026-12-07 23:50 UTC before any run.
    # The timed steps come after its learning steps (prefilter_learn_steps: 1 here, so the timed rounds are
    # the steady state; the one-stage learning step is that of "ftw (one stage, exact b)")
    (
        "ftw[learned, m=2k]",
        "ftw",
        lambda k, T: {"prefilter": "learned", "filter_size": 2 * k, "prefilter_learn_steps": 1},
    ),
    ("ftw[learned, m=k]", "ftw", lambda k, T: {"prefilter": "learned", "filter_size": k, "prefilter_learn_steps": 1}),
    # added 2026-12-07 23:55 UTC before any run: no stage 2 on a scored step (the counted and timed steps are scored
    # steps; 'predicted' amortises the one-stage labelling step every 16, the one-stage row's cost)
    (
        "ftw[learned score, R=16]",
        "ftw",
        lambda k, T: {
            "prefilter": "learned",
            "prefilter_stage2": "score",
            "prefilter_learn_steps": 1,
            "prefilter_label_every": 16,
        },
    ),
    # added 2026-12-08 03:15 UTC before any run: the labelling step itself (every step a learning step: the whole pool
    # to stage 2, which keeps every u > 0, so its Gram has no filter cap), and the scored step with the overlap
    # features at R = 32 (the counted and timed steps are scored steps; 'predicted' amortises a one-stage step every 32)
    (
        "ftw[learned, labelling step]",
        "ftw",
        lambda k, T: {"prefilter": "learned", "filter_ratio": 1.0, "prefilter_learn_steps": 1_000_000},
    ),
    (
        "ftw[learned score + overlap, R=32]",
        "ftw",
        lambda k, T: {
            "prefilter": "learned",
            "prefilter_stage2": "score",
            "prefilter_learn_steps": 1,
            "prefilter_label_every": 32,
            "prefilter_overlap": True,
        },
    ),
]

#: size: (T, k); "cpu-compute" is the speed benchmark's compute-bound CPU size (hidden 256, 4 layers)
POINTS = {"cpu-compute": (256, 16), "small": (32, 16), "gpu-100m": (1024, 16)}


def predicted_ratio(label: str, size: str, T: int, k: int, n: int, num_target: int) -> float | None:
    """selection/cost_model.py's step FLOPs / plain-k for a variant (None: not FTW, no formula)."""
    method, options = next((m, o) for name, m, o in VARIANTS if name == label)
    if method == "random":
        return 1.0
    if method != "ftw":
        return None
    hidden, layers, inter = SIZES[size]
    heads, kv_heads = max(4, hidden // 64), max(2, hidden // 128)
    h = head_share(hidden, layers, inter, kv_heads * (hidden // heads), VOCAB, T)
    opts = options(k, T) if callable(options) else options
    config = FTWConfig(budget=k, **(opts or {}))
    return step_flops(StepShape.of(config, n, num_target, T, layers, h))


def plain_k(model, opt, pool, k: int, device) -> float:
    """Seconds of a plain step on the pool's first k rows (the rows random would train on are as long)."""
    sync(device)
    t0 = time.perf_counter()
    train_step(model, opt, {key: v[:k] for key, v in pool.items()}, torch.full((k,), 1.0 / k, device=device))
    sync(device)
    return time.perf_counter() - t0


def table(device, size: str, ratio: int, repeats: int, only: list[str] | None) -> dict:
    T, k = POINTS[size]
    n = ratio * k
    model = build_model(device, max_pos=max(64, T), size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(3):  # optimizer state exists
        train_step(model, opt, make_pool(n, T, 1000 + s, device), torch.full((n,), 1.0 / n, device=device))
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(k, T, 999, device)
    methods = []
    for label, method, options in VARIANTS:
        if only and label not in only:
            continue
        opts = options(k, T) if callable(options) else options
        methods.append(Method(label, method, opts if method == "ftw" else None, model, opt, k))
    plain = interleaved_rounds(
        methods,
        pools,
        target,
        device,
        lambda pool: plain_k(model, opt, pool, k, device),
        f"[overhead] {size} N/k={ratio}",
        "plain-k",
    )
    one = {key: v[:k] for key, v in pools[0].items()}
    flops_k = count_flops(lambda: train_step(model, opt, one, torch.full((k,), 1.0 / k, device=device)))
    flops_n = count_flops(lambda: train_step(model, opt, pools[0], torch.full((n,), 1.0 / n, device=device)))
    rows = {}
    for m in methods:
        m.flops = count_flops(lambda: m.step(pools[0], target, device, record=False))
        row = m.row()
        rows[m.name] = {
            "time_ratio": row["ratio_to_plain"],
            "flop_ratio": m.flops / flops_k,
            "flop_ratio_to_plain_N": m.flops / flops_n,
            "step_s": row["step_s"],
            "phases_s": row["phases_s"],
            "ratios": row["ratios"],
        }
    return {
        "size": size,
        "T": T,
        "k": k,
        "N": n,
        "V": k,
        "plain_k_s": statistics.median(plain),
        "plain_k_flops": flops_k,
        "plain_N_flops": flops_n,
        "rows": rows,
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [
        "# Step overhead: step / a plain step on the k samples it trains on",
        "",
        f"Command: `{meta['command']}` — {meta['date']}, {meta['device_name']}, {meta['repeats']} interleaved "
        f"rounds after a warm-up round. time = median over rounds of step / that round's mean plain-k step; "
        f"FLOPs = counted matmul + attention FLOPs of one step / the plain-k step's; 'vs plain-N' = the old "
        f"reference, FLOPs / a plain step over the whole pool. |V| = k target rows. 'predicted' = "
        f"selection/cost_model.py's step_flops (docs/design.md#two-stage's formulas) for a step that trains k rows "
        f"and, with target_refresh, amortised over the refresh period; the counted step is one step (a refresh "
        f"step), and FTW often trains fewer than k rows (its QP's non-zero weights), so counted can be lower.",
        "",
    ]
    for block in results["tables"]:
        lines += [
            f"## {block['size']} (T {block['T']}), k {block['k']}, N {block['N']} (N/k = {block['N'] // block['k']})",
            "",
            f"plain-k step {block['plain_k_s'] * 1e3:.0f} ms",
            "",
            "| method | time / plain-k | FLOPs / plain-k | predicted FLOPs / plain-k | FLOPs / plain-N | step ms |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in block["rows"].items():
            pred = predicted_ratio(name, block["size"], block["T"], block["k"], block["N"], block["V"])
            lines.append(
                f"| {name} | {r['time_ratio']:.2f} | {r['flop_ratio']:.2f} | "
                f"{'—' if pred is None else f'{pred:.2f}'} | {r['flop_ratio_to_plain_N']:.3f} | "
                f"{r['step_s'] * 1e3:.0f} |"
            )
        lines.append("")
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "overhead.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({b["size"] for b in results["tables"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes) + 3, 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        blocks = [b for b in results["tables"] if b["size"] == size]
        names = list(blocks[0]["rows"])
        colors = plt.get_cmap("tab20")
        for i, name in enumerate(names):
            xs = [b["N"] // b["k"] for b in blocks]
            ax.plot(
                xs,
                [b["rows"][name]["flop_ratio"] for b in blocks],
                marker="osD^v<>"[i % 7],
                color=colors(i % 20),
                ls="-" if "head only" in name or name == "random" else "--",
                label=name,
            )
        ax.axhline(1.25, color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N / k")
        ax.set_ylabel("step FLOPs / plain step on k")
        ax.set_title(f"{size}: overhead in counted FLOPs (dashed: 1.25x)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Redraw overhead.png from a stored overhead.json (the tables are not touched)."""
    _plot(json.loads((out / "overhead.json").read_text()), out / "overhead.png")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small size, N/k 2 and 4, 1 round (CI)")
    parser.add_argument("--sizes", default="cpu-compute,small")
    parser.add_argument("--ratios", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=None, help="labels separated by ';' (labels contain commas; default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default: results/overhead (quick: results/overhead_quick)")
    args = parser.parse_args(argv)
    sizes = ["small"] if args.quick else args.sizes.split(",")
    ratios = [2, 4] if args.quick else [int(r) for r in args.ratios.split(",")]
    repeats = 1 if args.quick else args.repeats
    only = [m.strip() for m in args.methods.split(";")] if args.methods else None
    unknown = sorted(set(only or []) - {label for label, _, _ in VARIANTS})
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {'; '.join(label for label, _, _ in VARIANTS)}")
    device = torch.device(args.device)
    tables = [table(device, size, ratio, repeats, only) for size in sizes for ratio in ratios]
    results = {
        "meta": {
            "command": "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "repeats": repeats,
            "device_name": torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        },
        "tables": tables,
    }
    out = Path(args.out or ("results/overhead_quick" if args.quick else "results/overhead"))
    write(results, out)
    print((out / "overhead.md").read_text())
    return results


if __name__ == "__main__":
    main()
