"""Distributed FTW benchmark: selector bytes per step vs the engine's own parameter traffic, and FTW's
per-phase time with R = 1 vs R = 2 ranks, on both engines (FSDP2, DeepSpeed ZeRO-3), CPU + gloo.

    python -m benchmarks.distributed_select [--quick] [--out DIR] [--engines fsdp2,deepspeed]
                                            [--ranks 1,2] [--grams exact+direction,sketch+sketches,auto+factors,
                                            auto+direction] [--repeats 10]

A "gram" label is ``<gram backend>+<exchange>`` (direction: the default, factors, sketches).
For every (engine, R, label) R real processes are spawned (``torch.multiprocessing``, gloo,
one intra-op thread per rank by default). Each builds the demo-sized tiny Llama (benchmarks/speed.py
``build_model``: hidden 64, 2 layers, vocab 259) inside the real engine (``build_engine``: FSDP2
``fully_shard`` per decoder layer + root, or DeepSpeed ZeRO-3 with configs/deepspeed/zero3.json),
takes a few optimizer steps so AdamW state exists, then runs the loop the trainer runs: FTW
``select`` on the rank's N/R share of a global pool of N (the same global pools and target for every
R; the selector's model view re-shards afterwards) → the trainer's own ``backward_on_selection`` (the
single pass where the engine takes it, else a weighted forward/backward on the rank's chosen rows) → step.

Recorded, per rank:
- time: wall time of ``select`` and its phases (``Selection.timings``), and of the training step
  (``backward_on_selection`` + step), mean over ``repeats`` steps after one warm-up step; ranks start each
  select together (barrier). Tables show the slowest rank per column; the JSON has every rank.
- selector bytes: ``Selection.diagnostics["comm_bytes"]`` (optsel.distributed.CommCounter: the
  payload each rank hands to the selector's collectives: all-reduce/broadcast count the tensor once,
  all-gather its gathered output).
- engine bytes, measured: one extra step (select + training step) runs under a
  ``TorchDispatchMode`` that sees every c10d collective op (``torch.ops.c10d.*`` — what
  torch.distributed's Python API and DeepSpeed's comm layer call — and the functional collectives
  ``torch.ops._c10d_functional.*`` that DTensor uses) and counts its payload with the CommCounter's
  convention (all-gather: gathered output; reduce-scatter: full input; all-reduce / broadcast:
  the tensor). A collective is attributed to the selector when ``optsel/distributed.py`` is on the
  Python stack that issued it, else to the engine. So the engine's traffic *during select* (the
  parameter all-gathers triggered by FTW's own forward/backward over the pool and the target:
  "capture") is measured separately from its traffic in the training step. The selector's share of
  the dispatch count must equal the CommCounter's (checked and reported).
- engine bytes, analytic: 3 · P · 4 bytes (fp32 on CPU) per training step: all-gather of every
  parameter in forward, again in backward, reduce-scatter of the gradients (ZeRO-3 / FSDP2 in the
  CommCounter's payload convention); "ring wire" columns multiply payloads by (R−1)/R (all-reduce:
  2(R−1)/R), what a ring algorithm sends per rank.

Outputs under results/distributed_select/ (quick: results/distributed_select_quick/):
distributed_select.json, distributed_select.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.distributed_select_report import fmt_bytes, notes, split_label, summarize, write
from benchmarks.ranks import collective_counter, logging_quiet, run_ranks

REPO = Path(__file__).resolve().parents[1]
ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"


# -- one rank ---------------------------------------------------------------------------------------


def _share(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def _worker(rank: int, world: int, engine_name: str, grams: list[str], s: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.speed import build_model, make_pool
    from optsel import distributed
    from optsel.pipeline.engines.shared import EngineConfig, OptimizerConfig, build_engine
    from optsel.pipeline.train.trainer import backward_on_selection
    from optsel.selection.ftw import FilterThenWeight, FTWConfig

    logging_quiet()
    device = torch.device("cpu")
    n, k, T = s["N"], s["k"], s["T"]
    model = build_model(device, max_pos=T, seed=0)
    num_params = sum(p.numel() for p in model.parameters())
    steps_total = s["warm_steps"] + len(grams) * (1 + s["repeats"] + 1) + 1
    engine = build_engine(
        EngineConfig(name=engine_name, deepspeed_config=str(ZERO3_JSON), precision="fp32"),
        model,
        OptimizerConfig(lr=3e-3, betas=(0.9, 0.95), schedule="constant", grad_clip=1.0),
        total_steps=steps_total,
        micro_batch_size=max(1, k // world),
    )
    per_rank_params = _local_param_numel(engine)

    def train_step(batch, weights) -> float:
        t0 = time.perf_counter()
        engine.forward_backward(batch, weights, loss_scale=float(world))
        engine.step()
        return time.perf_counter() - t0

    # a few optimizer steps on the whole (global) pool so AdamW state exists
    for w in range(s["warm_steps"]):
        pool = make_pool(n, T, 5000 + w, device)
        train_step(_share(pool, rank, world), torch.full((n // world,), 1.0 / n))

    target = _share(make_pool(s["num_target"], T, 999, device), rank, world)
    out: dict[str, Any] = {
        "rank": rank,
        "world": world,
        "engine": engine_name,
        "num_params": num_params,
        "local_param_numel": per_rank_params,
        "threads": torch.get_num_threads(),
        "grams": {},
    }

    def one_step(ftw, pool, counted: bool):
        """The trainer's step: select, then the trainer's own backward on the selection, then step."""
        counter = collective_counter(world) if counted else None
        distributed.barrier()
        t0 = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():
            sel = ftw.select(pool, target)
        t_select = time.perf_counter() - t0
        sel_counts = counter.totals() if counter is not None else None
        counter2 = collective_counter(world) if counted else None
        distributed.barrier()
        t0 = time.perf_counter()
        with counter2 if counter2 is not None else contextlib.nullcontext():
            backward_on_selection(engine, pool, sel, world)
            engine.step()
        t_train = time.perf_counter() - t0
        return sel, t_select, t_train, sel_counts, (counter2.totals() if counter2 is not None else None)

    for gram in grams:
        backend, exchange = split_label(gram)
        ftw = FilterThenWeight(
            engine.unwrapped_model,
            engine.optimizer,
            FTWConfig(
                budget=k,
                filter_ratio=0.5,
                gram=backend,
                exchange=exchange,
                geometry="adam",
                sketch_dim_out=s["sketch_dim"],
                sketch_dim_in=s["sketch_dim"],
            ),
            seed=0,
        )
        rec: dict[str, Any] = {
            "select_s": [],
            "train_s": [],
            "phases_s": [],
            "comm_bytes": [],
            "comm_by_op": [],
            "comm_by_phase": [],
            "comm_calls": [],
            "indices": [],
            "weights": [],
            "optimizer_step": [],
            "backends": None,
        }
        for r in range(1 + s["repeats"]):  # r = 0: warm-up, not recorded
            pool = _share(make_pool(n, T, r, device), rank, world)
            sel, t_select, t_train, _, _ = one_step(ftw, pool, counted=False)
            if r == 0:
                continue
            rec["select_s"].append(t_select)
            rec["train_s"].append(t_train)
            rec["phases_s"].append(dict(sel.timings))
            rec["comm_bytes"].append(int(sel.diagnostics["comm_bytes"]))
            rec["comm_by_op"].append(dict(ftw.comm.by_op))
            rec["comm_by_phase"].append(dict(sel.diagnostics.get("comm_by_phase", {})))
            rec["comm_calls"].append(int(ftw.comm.calls))
            rec["indices"].append(sel.indices.tolist())
            rec["weights"].append([float(x) for x in sel.weights])
            rec["optimizer_step"].append(int(sel.diagnostics["optimizer_step"]))
            rec["backends"] = sel.diagnostics["gram_backends"]
        rec["factor_width"] = sum(layer.d_in + layer.d_out for layer in ftw.coverage.layers)
        rec["sketch_elems"] = len(ftw.coverage.layers) * ftw.config.sketch_dim_out * ftw.config.sketch_dim_in
        # the counted step: every collective during select and during the training step
        pool = _share(make_pool(n, T, 10_000, device), rank, world)
        sel, _, _, sel_counts, train_counts = one_step(ftw, pool, counted=True)
        rec["dispatch_select"] = sel_counts
        rec["dispatch_train"] = train_counts
        rec["comm_bytes_counted_step"] = int(sel.diagnostics["comm_bytes"])
        out["grams"][gram] = rec

    # a training step on its own (no select before it), counted
    pool = make_pool(n, T, 20_000, device)
    counter = collective_counter(world)
    distributed.barrier()
    with counter:
        train_step(_share(pool, rank, world), torch.full((n // world,), 1.0 / n))
    out["dispatch_train_full_pool"] = counter.totals()
    if hasattr(engine, "close"):
        engine.close()
    if dist.is_initialized():
        dist.barrier()
    return out


def _local_param_numel(engine) -> int:
    """Elements of the parameters this rank holds between steps (its shards)."""
    total = 0
    for p in engine.unwrapped_model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition (padding included)
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            total += p.to_local().numel()
        else:
            total += p.numel()
    return int(total)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=16, k=4, T=32, 2 repeats, gram auto only")
    parser.add_argument("--out", default=None, help="default: results/distributed_select (quick: ..._quick)")
    parser.add_argument("--engines", default="fsdp2,deepspeed")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument(
        "--grams",
        default=None,
        help="comma list of <gram backend>+<exchange> (default: "
        "exact+direction,sketch+sketches,auto+factors,auto+direction; a bare backend: +factors)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--sketch-dim",
        type=int,
        default=16,
        help="k_o = k_i of every sketch (default 16: 1/4 of this 64-wide model's layers; FTWConfig's "
        "default 32 is 1/128 of a 4096-wide layer)",
    )
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per (engine, R) run")
    args = parser.parse_args(argv)
    if args.quick:
        s = {"N": 16, "k": 4, "T": 32, "num_target": 8, "repeats": 2, "warm_steps": 2}
        grams = ["auto+direction"]
    else:
        s = {"N": 64, "k": 16, "T": 64, "num_target": 32, "repeats": 10, "warm_steps": 3}
        # auto last: one process moves no bytes, so auto picks by FLOPs there and may pick other backends than on
        # R ≥ 2: R = 1 and R = 2 selections (and the training that follows) may differ by design
        grams = ["exact+direction", "sketch+sketches", "auto+factors", "auto+direction"]
    if args.grams:
        grams = [g.strip() for g in args.grams.split(",") if g.strip()]
    if args.repeats is not None:
        s["repeats"] = args.repeats
    s["sketch_dim"] = args.sketch_dim
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    ranks = [int(r) for r in args.ranks.split(",")]
    for r in ranks:
        if s["N"] % r or s["num_target"] % r:
            raise SystemExit(f"--ranks: N={s['N']} and the target size {s['num_target']} must divide by R={r}")

    from benchmarks import distributed_select as this  # picklable worker under `python -m` too

    start = time.time()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for engine in engines:
        for R in ranks:
            t0 = time.time()
            res = run_ranks(this._worker, R, engine, (engine, grams, s), args.threads_per_rank, args.timeout)
            for gram in grams:
                rows.append(summarize(res, gram, s))
                r = rows[-1]
                print(
                    f"[distributed_select] {engine:9s} R={R} {gram:6s} select {r['select_s'] * 1e3:7.1f} ms  "
                    f"selector {fmt_bytes(r['selector_bytes'])}  engine/train step "
                    f"{fmt_bytes(r['engine_bytes_train_step'])}  engine during select "
                    f"{fmt_bytes(r['engine_bytes_during_select'])}  ({time.time() - t0:.0f} s)",
                    flush=True,
                )
    import deepspeed
    import transformers

    meta = {
        "mode": "quick" if args.quick else "default",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            [
                "python -m benchmarks.distributed_select",
                *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            ]
        ),
        "machine": " ".join(
            x for x in (platform.machine(), platform.processor(), platform.system(), platform.release()) if x
        ),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "threads_per_rank": args.threads_per_rank,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "num_params": rows[0]["num_params"] if rows else 0,
        "engines": engines,
        "ranks": ranks,
        "grams": grams,
        "wall_s": time.time() - start,
        **s,
    }
    results = {"meta": meta, "rows": rows}
    results["notes"] = notes(rows, meta)
    out = Path(args.out or ("results/distributed_select_quick" if args.quick else "results/distributed_select"))
    write(results, out)
    print((out / "distributed_select.md").read_text())
    return results


if __name__ == "__main__":
    main()
