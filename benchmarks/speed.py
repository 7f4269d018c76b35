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
from optsel.selection.capture import per_sample_loss

VOCAB = 259


def build_model(device: torch.device, max_pos: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      attn_implementation="sdpa")
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
    loss = (per_sample_loss(logits, batch["labels"])[0] * weights.to(logits.dtype)).sum()
    loss.backward()
    opt.step()


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def make_selector(method: str, model, opt, k: int, gram: str | None):
    factory = get_selector_factory(method)
    config = None
    if method == "ftw":
        config = factory.config_class(budget=k, gram=gram)
    return factory(model=model, optimizer=opt, budget=k, seed=0, config=config)


def time_method(method, gram, model, opt, pools, target, k, device, repeats) -> dict:
    selector = make_selector(method, model, opt, k, gram)
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
        batch = {key: v[rows] for key, v in pool.items()}
        train_step(model, opt, batch, sel.local_weights.to(device))
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


def step_table(device, n, T, k, repeats) -> dict:
    model = build_model(device, max_pos=max(64, T))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm = [make_pool(n, T, 1000 + s, device) for s in range(3)]
    for p in warm:
        train_step(model, opt, p, torch.full((n,), 1.0 / n, device=device))
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(max(4, k), T, 999, device)
    configs = [("random", None), ("full", None), ("greats", None), ("uds", None),
               ("ftw", "exact"), ("ftw", "ghost"), ("ftw", "sketch")]
    time_plain(model, opt, pools[:2], device, 1)  # global warm-up pass: first-call costs out of the table
    for method, gram in configs:
        time_method(method, gram, model, opt, pools[:2], target, k if method != "full" else n, device, 1)
    rows = {"plain": time_plain(model, opt, pools, device, repeats)}
    for method, gram in configs:
        name = method if gram is None else f"{method}[{gram}]"
        rows[name] = time_method(method, gram, model, opt, pools, target, k if method != "full" else n,
                                 device, repeats)
        rows[name]["ratio_to_plain"] = rows[name]["step_s"] / rows["plain"]["step_s"]
        print(f"[speed] {name:12s} step {rows[name]['step_s'] * 1e3:8.1f} ms  "
              f"x{rows[name]['ratio_to_plain']:.2f} of plain", flush=True)
    return rows


def seq_sweep(device, n, k, lengths, repeats, cap_s) -> dict:
    """FTW select seconds vs T per backend; a backend is dropped after a T whose select exceeds cap_s."""
    out: dict[str, dict[int, float]] = {g: {} for g in ("exact", "ghost", "sketch")}
    model = build_model(device, max_pos=max(lengths))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, make_pool(n, 64, 7, device), torch.full((n,), 1.0 / n, device=device))
    for T in lengths:
        pool, target = make_pool(n, T, 11, device), make_pool(4, T, 12, device)
        for gram, res in out.items():
            if res and max(res.values()) > cap_s:
                continue
            factory = get_selector_factory("ftw")
            sel = factory(model=model, optimizer=opt, budget=k, seed=0,
                          config=factory.config_class(budget=k, gram=gram, capture_chunk_size=4))
            times = []
            for r in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                sel.select(pool, target)
                sync(device)
                if r:
                    times.append(time.perf_counter() - t0)
            res[T] = sum(times) / len(times)
            print(f"[speed] T={T:5d} {gram:6s} select {res[T]:.3f} s", flush=True)
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(jsonio.dumps(results, indent=2))
    st = results["steps"]
    phases = sorted({p for r in st.values() for p in r.get("phases_s", {})})
    meta = results["meta"]
    lines = [f"# Speed benchmark ({meta['mode']}, {meta['device_name']})", "",
             f"Command: `{meta.get('command', 'python -m benchmarks.speed')}` — {meta.get('date', '')}; torch "
             f"{meta.get('torch', '')}, {meta.get('threads', '?')} threads.", "",
             f"N = {results['meta']['N']}, k = {results['meta']['k']}, T = {results['meta']['T']}; "
             f"mean over {results['meta']['repeats']} steps after one warm-up. Times in ms; ratio = step / plain step over all N.", "",
             "| method | step | ratio | select | train | " + " | ".join(phases) + " | peak mem (MiB) |",
             "|---|---|---|---|---|" + "---|" * len(phases) + "---|"]
    for name, r in st.items():
        ph = " | ".join(f"{r.get('phases_s', {}).get(p, 0.0) * 1e3:.1f}" for p in phases)
        lines.append(f"| {name} | {r['step_s'] * 1e3:.1f} | {r.get('ratio_to_plain', 1.0):.2f} | "
                     f"{r.get('select_s', 0.0) * 1e3:.1f} | {r.get('train_s', r['step_s']) * 1e3:.1f} | {ph} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    sw = {gram: {int(t): v for t, v in res.items()} for gram, res in results["seq_sweep"].items()}  # JSON: str keys
    Ts = sorted({t for res in sw.values() for t in res})
    lines += ["", f"FTW select time (s) vs sequence length T (N = {results['meta']['sweep_N']}, "
                  f"k = {results['meta']['sweep_k']}); '—': skipped after exceeding the time cap.", "",
              "| backend | " + " | ".join(str(t) for t in Ts) + " |", "|---|" + "---|" * len(Ts)]
    for gram, res in sw.items():
        lines.append(f"| {gram} | " + " | ".join(f"{res[t]:.3f}" if t in res else "—" for t in Ts) + " |")
    (out / "speed.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default: results/speed (quick: results/speed_quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        n, T, k, repeats, lengths, sweep_n, cap = 16, 32, 4, 2, [128, 256], 8, 30.0
    else:
        n, T, k, repeats, lengths, sweep_n, cap = 64, 32, 16, 5, [128, 256, 512, 1024, 2048, 4096], 16, 60.0
    results = {"meta": {"mode": "quick" if args.quick else "default", "device": str(device),
                        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                        "threads": torch.get_num_threads(), "N": n, "T": T, "k": k, "repeats": repeats,
                        "sweep_N": sweep_n, "sweep_k": max(2, sweep_n // 4), "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "command": "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])}}
    results["steps"] = step_table(device, n, T, k, repeats)
    results["seq_sweep"] = seq_sweep(device, sweep_n, max(2, sweep_n // 4), lengths, 1, cap)
    out = Path(args.out or ("results/speed_quick" if args.quick else "results/speed"))
    write(results, out)
    print((out / "speed.md").read_text())
    return results


if __name__ == "__main__":
    main()
