"""Speed benchmark: wall time per step, by phase, of random / full / greats / uds / ftw (each Gram
backend), as ratios to a plain training step over the whole pool; peak memory; FTW select time vs
sequence length T per Gram backend.

    python -m benchmarks.speed [--quick] [--out results/speed] [--device cpu|cuda]

The model is the demo's tiny Llama (hidden 64, 2 layers, byte vocabulary 259), trained with
torch AdamW a few steps first so the optimizer state exists; pools are random token sequences with
random lengths (right padding, first 4 tokens prompt). One step of a method = select + forward/
backward on the chosen samples with their weights + optimizer step; the reference ("plain") step is
forward/backward + optimizer step on all N. On CUDA every timed region is synchronized and each
configuration is warmed up first (a whole warm-up pass over all configurations, then one
warm-up step per configuration). Peak memory: CUDA max_memory_allocated per configuration; on CPU
the process's peak RSS (ru_maxrss, monotone over the run, so only an upper bound).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from optsel.pipeline import jsonio
from optsel.selection.base import get_selector_factory
from optsel.losses import per_sample_token_mean_ce

VOCAB = 259


SIZES = {  # name: (hidden, layers, intermediate); "small" is the demo's model, the others compute-bound
    "small": (64, 2, 128), "cpu-compute": (256, 4, 512), "gpu-100m": (1024, 8, 2816)}


def build_model(device: torch.device, max_pos: int, seed: int = 0, size: str = "small"):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128),
                      max_position_embeddings=max_pos, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def make_pool(n: int, T: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(4, T // 2), T + 1, (n,), generator=gen)
    lengths[0] = T
    ids = torch.randint(3, VOCAB, (n, T), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = (ids * mask).masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, batch, weights) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = (per_sample_token_mean_ce(logits, batch["labels"]).loss * weights.to(logits.dtype)).sum()
    loss.backward()
    opt.step()


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def make_selector(method: str, model, opt, k: int, options: dict | None):
    factory = get_selector_factory(method)
    config = None
    if method == "ftw":
        config = factory.config_class(budget=k, **(options or {}))
    return factory(model=model, optimizer=opt, budget=k, seed=0, config=config)


# (label, method, FTW options): ftw's default is the single pass with the active-set solver
CONFIGS = [("random", "random", None), ("full", "full", None), ("greats", "greats", None), ("uds", "uds", None),
           ("ftw[exact]", "ftw", {"gram": "exact"}),
           ("ftw[exact, two-pass]", "ftw", {"gram": "exact", "single_pass": False}),
           ("ftw[exact, refresh 8]", "ftw", {"gram": "exact", "target_refresh": 8}),
           ("ftw[exact, two-pass, fista]", "ftw", {"gram": "exact", "single_pass": False, "solver": "torch"}),
           ("ftw[ghost]", "ftw", {"gram": "ghost"}), ("ftw[sketch]", "ftw", {"gram": "sketch"}),
           ("ftw[auto]", "ftw", {"gram": "auto"})]


def time_method(method, options, model, opt, pools, target, k, device, repeats) -> dict:
    selector = make_selector(method, model, opt, k, options)
    phases: dict[str, float] = {}
    totals = {"select": 0.0, "train": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for r, pool in enumerate(pools):  # pools[0] is the warm-up
        sync(device)
        t0 = time.perf_counter()
        sel = selector.select(pool, target if selector.needs_target else None)
        sync(device)
        t1 = time.perf_counter()
        rows = sel.local_indices.to(device)
        if sel.pool_pass is not None:  # the single pass: the gradient from the capture, no second forward
            opt.zero_grad(set_to_none=True)
            sel.pool_pass.accumulate_into_grads(rows, sel.local_weights.to(device))
            opt.step()
        else:
            train_step(model, opt, {key: v[rows] for key, v in pool.items()}, sel.local_weights.to(device))
        sync(device)
        t2 = time.perf_counter()
        if r == 0:
            continue
        totals["select"] += t1 - t0
        totals["train"] += t2 - t1
        for phase, sec in sel.timings.items():
            phases[phase] = phases.get(phase, 0.0) + sec
    return {"select_s": totals["select"] / repeats, "train_s": totals["train"] / repeats,
            "step_s": (totals["select"] + totals["train"]) / repeats,
            "phases_s": {p: s / repeats for p, s in phases.items()}, "peak_memory_bytes": peak_memory(device)}


def time_plain(model, opt, pools, device, repeats) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = 0.0
    for r, pool in enumerate(pools):
        n = pool["input_ids"].shape[0]
        sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, pool, torch.full((n,), 1.0 / n, device=device))
        sync(device)
        if r:
            total += time.perf_counter() - t0
    return {"step_s": total / repeats, "peak_memory_bytes": peak_memory(device)}


def step_table(device, n, T, k, repeats, size: str = "small") -> dict:
    model = build_model(device, max_pos=max(64, T), size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm = [make_pool(n, T, 1000 + s, device) for s in range(3)]
    for p in warm:
        train_step(model, opt, p, torch.full((n,), 1.0 / n, device=device))
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(max(4, k), T, 999, device)
    time_plain(model, opt, pools[:2], device, 1)  # global warm-up pass: first-call costs out of the table
    for _, method, options in CONFIGS:
        time_method(method, options, model, opt, pools[:2], target, k if method != "full" else n, device, 1)
    rows = {"plain": time_plain(model, opt, pools, device, repeats)}
    for name, method, options in CONFIGS:
        rows[name] = time_method(method, options, model, opt, pools, target, k if method != "full" else n,
                                 device, repeats)
        rows[name]["ratio_to_plain"] = rows[name]["step_s"] / rows["plain"]["step_s"]
        print(f"[speed] {name:12s} step {rows[name]['step_s'] * 1e3:8.1f} ms  "
              f"x{rows[name]['ratio_to_plain']:.2f} of plain", flush=True)
    return rows


#: select-vs-T variants: (label, gram, capture chunking). Memory is bounded by chunking in both: 4 samples
#: per capture pass (as first committed), or a token budget of 4 × the sweep's longest T — the same bound at
#: the longest T, whole-pool passes at short T (added 2026-11-27; both reported)
def sweep_variants(max_T: int) -> list[tuple[str, str, dict]]:
    tokens = 4 * max_T
    return [("auto", "auto", {"capture_chunk_size": 4}), ("exact", "exact", {"capture_chunk_size": 4}),
            (f"auto, ≤ {tokens} tokens/pass", "auto", {"capture_chunk_tokens": tokens}),
            (f"exact, ≤ {tokens} tokens/pass", "exact", {"capture_chunk_tokens": tokens})]


def seq_sweep(device, n, k, lengths, repeats, cap_s, size: str = "small") -> dict:
    """FTW select seconds and the plain step over the same N at each T (:func:`sweep_variants`: the
    default "auto" and "exact", chunked by samples and by tokens); a variant is dropped after a T whose
    select exceeds cap_s."""
    variants = sweep_variants(max(lengths))
    out: dict[str, dict[int, dict[str, float]]] = {label: {} for label, _, _ in variants}
    model = build_model(device, max_pos=max(lengths), size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, make_pool(n, 64, 7, device), torch.full((n,), 1.0 / n, device=device))
    for T in lengths:
        pool, target = make_pool(n, T, 11, device), make_pool(4, T, 12, device)
        plain = time_plain(model, opt, [pool] * (repeats + 1), device, repeats)["step_s"]
        for label, gram, chunking in variants:
            res = out[label]
            if res and max(r["select_s"] for r in res.values()) > cap_s:
                continue
            factory = get_selector_factory("ftw")
            sel = factory(model=model, optimizer=opt, budget=k, seed=0,
                          config=factory.config_class(budget=k, gram=gram, **chunking))
            times = []
            for r in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                sel.select(pool, target)
                sync(device)
                if r:
                    times.append(time.perf_counter() - t0)
            res[T] = {"select_s": sum(times) / len(times), "plain_s": plain}
            res[T]["ratio"] = res[T]["select_s"] / plain
            print(f"[speed] T={T:5d} {label:28s} select {res[T]['select_s']:.3f} s, plain {plain:.3f} s, "
                  f"ratio {res[T]['ratio']:.2f}", flush=True)
    return out


def solver_table(repeats: int = 50) -> dict:
    """Milliseconds per weight QP (b, K as FTW forms them) for each solver at m = 32 and 256."""
    from optsel.selection.solvers import active_set_qp, cvxpy_qp, torch_qp

    out: dict[str, dict[str, float]] = {}
    for m in (32, 256):
        gen = torch.Generator().manual_seed(m)
        G = torch.randn(m, 200, generator=gen, dtype=torch.float64) * torch.rand(m, 1, generator=gen, dtype=torch.float64)
        b, K = G @ torch.randn(200, generator=gen, dtype=torch.float64) / 200 ** 0.5, G @ G.T / 200
        for name, fn, reps in (("active_set", active_set_qp, repeats), ("torch (FISTA + polish)", torch_qp, 3),
                               ("cvxpy (OSQP)", cvxpy_qp, 3)):
            try:
                fn(b, K, 2.0)
            except ImportError:  # cvxpy not installed (e.g. a GPU image): no row
                continue
            for tau in (2.0, 8.0):
                fn(b, K, tau)
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(b, K, tau)
                out.setdefault(f"{name}", {})[f"m={m}, tau={tau:g}"] = (time.perf_counter() - t0) / reps * 1e3
    return out


def _step_lines(title: str, st: dict, meta: dict) -> list[str]:
    phases = sorted({p for r in st.values() for p in r.get("phases_s", {})})
    lines = [f"## {title}", "",
             "| method | step | ratio | select | train | " + " | ".join(phases) + " | peak mem (MiB) |",
             "|---|---|---|---|---|" + "---|" * len(phases) + "---|"]
    for name, r in st.items():
        ph = " | ".join(f"{r.get('phases_s', {}).get(p, 0.0) * 1e3:.1f}" for p in phases)
        lines.append(f"| {name} | {r['step_s'] * 1e3:.1f} | {r.get('ratio_to_plain', 1.0):.2f} | "
                     f"{r.get('select_s', 0.0) * 1e3:.1f} | {r.get('train_s', r['step_s']) * 1e3:.1f} | {ph} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    return lines + [""]


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [f"# Speed benchmark ({meta['mode']}, {meta['device_name']})", "",
             f"Command: `{meta.get('command', 'python -m benchmarks.speed')}` — {meta.get('date', '')}; torch "
             f"{meta.get('torch', '')}, {meta.get('threads', '?')} threads.", "",
             f"Mean over {meta['repeats']} steps after warm-up. Times in ms; ratio = step / plain step (forward + "
             f"backward + AdamW over all N). ftw[...] rows use the single pass and the active-set solver unless "
             f"named otherwise; 'refresh 8' recomputes the target gradient every 8 steps.", ""]
    for size, block in results["steps"].items():
        lines += _step_lines(f"{size}: N = {block['N']}, k = {block['k']}, T = {block['T']}, "
                             f"model {block['model']}", block["rows"], meta)
    sw = results["seq_sweep"]
    Ts = sorted({int(t) for res in sw.values() for t in res})
    lines += [f"## select / plain step against T (N = {meta['sweep_N']}, k = {meta['sweep_k']}, "
              f"model {meta['sweep_model']})", "",
              "'—': skipped after a select exceeded the time cap. Flat within 1.5x = linear in T like the step.", "",
              "| backend | " + " | ".join(str(t) for t in Ts) + " | max/min |", "|---|" + "---|" * (len(Ts) + 1)]
    for gram, res in sw.items():
        res = {int(t): v for t, v in res.items()}
        ratios = [res[t]["ratio"] for t in Ts if t in res]
        spread = max(ratios) / min(ratios) if ratios else float("nan")
        lines.append(f"| {gram} | " + " | ".join(f"{res[t]['ratio']:.2f} ({res[t]['select_s']:.2f} s)" if t in res
                                                 else "—" for t in Ts) + f" | {spread:.2f} |")
    lines += ["", "## Weight QP solve time (ms)", "", "| solver | " + " | ".join(next(iter(results['solvers'].values()))) + " |",
              "|---|" + "---|" * len(next(iter(results['solvers'].values())))]
    for name, row in results["solvers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(sw, out / "select_vs_T.png", meta)


def _plot_sweep(sw: dict, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for gram, res in sw.items():
        Ts = sorted(int(t) for t in res)
        ax.plot(Ts, [{int(t): v for t, v in res.items()}[t]["ratio"] for t in Ts], marker="o", label=gram)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("FTW select time / plain step time")
    ax.set_title(f"select / plain vs T ({meta['device_name']}, N = {meta['sweep_N']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default: results/speed (quick: results/speed_quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-T", type=int, default=None, help="longest T of the sweep (default 4096 CPU, 8192 CUDA)")
    parser.add_argument("--sizes", default=None, help="comma-separated step-table model sizes (default: both; "
                        "none: only the T sweep and the solver table)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        sizes = [("small", 16, 32, 4)]
        repeats, lengths, sweep_n, cap, sweep_size = 2, [128, 256], 8, 30.0, "small"
    else:  # (model size, N, T, k): the demo-sized step and a compute-bound one
        sizes = [("small", 64, 32, 16), ("gpu-100m" if cuda else "cpu-compute", 64, 512 if cuda else 256, 16)]
        max_T = args.max_T or (8192 if cuda else 4096)
        lengths = [t for t in (128, 256, 512, 1024, 2048, 4096, 8192) if t <= max_T]
        repeats, sweep_n, cap, sweep_size = 3, 16, 60.0, "gpu-100m" if cuda else "small"
    results = {"meta": {"mode": "quick" if args.quick else "default", "device": str(device),
                        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                        "threads": torch.get_num_threads(), "repeats": repeats,
                        "sweep_N": sweep_n, "sweep_k": max(2, sweep_n // 4), "sweep_model": sweep_size,
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "command": "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])},
               "steps": {}}
    if args.sizes:
        sizes = [row for row in sizes if row[0] in args.sizes.split(",")]
    for size, n, T, k in sizes:
        results["steps"][size] = {"N": n, "T": T, "k": k, "model": f"hidden/layers/ffn {SIZES[size]}",
                                  "rows": step_table(device, n, T, k, repeats, size)}
    results["seq_sweep"] = seq_sweep(device, sweep_n, max(2, sweep_n // 4), lengths, 1, cap, sweep_size)
    results["solvers"] = solver_table()
    out = Path(args.out or ("results/speed_quick" if args.quick else "results/speed"))
    write(results, out)
    print((out / "speed.md").read_text())
    return results


if __name__ == "__main__":
    main()
