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
R; the selector's model view re-shards afterwards) → weighted forward/backward on the rank's selected samples → step.

Recorded, per rank:
- time: wall time of ``select`` and its phases (``Selection.timings``), and of the training step
  (forward_backward + step), mean over ``repeats`` steps after one warm-up step; ranks start each
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
import datetime
import io
import os
import platform
import queue
import shlex
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from optsel.pipeline import jsonio

REPO = Path(__file__).resolve().parents[1]
ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"
TORCH_EXTENSIONS_DIR = str(Path.home() / ".cache" / "optsel" / "torch_extensions")
PHASES = ("capture", "target", "gather", "alignment", "gram", "filter", "solve")


# -- counting every collective ----------------------------------------------------------------------

def _collective_kind(name: str) -> str | None:
    """'all_gather' | 'reduce_scatter' | 'all_reduce' | 'broadcast' | 'other' for a collective op
    name (c10d::allgather_, _c10d_functional::all_reduce, ...), None for anything else."""
    if not name.startswith(("c10d::", "_c10d_functional::", "c10d_functional::")):
        return None
    op = name.split("::", 1)[1].split(".")[0].replace("_", "")
    if op.startswith("wait") or op in ("barrier", "monitoredbarrier"):
        return "other" if op.startswith("barrier") or op.startswith("monitored") else None
    for key, kind in (("allgather", "all_gather"), ("reducescatter", "reduce_scatter"), ("allreduce", "all_reduce"),
                      ("broadcast", "broadcast")):
        if key in op:
            return kind
    if op in ("send", "recv", "recvanysource", "gather", "scatter", "reduce", "alltoall", "alltoallbase",
              "alltoallsingle"):
        return "other"
    return None


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _wire_factor(kind: str, world: int) -> float:
    """Bytes a ring algorithm sends per rank, per payload byte."""
    if world <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (world - 1) / world


def _from_selector() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "optsel.distributed":
            return True
        frame = frame.f_back
    return False


def collective_counter(world: int):
    """A TorchDispatchMode that counts every c10d / functional collective (see module docstring)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by: dict[str, dict[str, dict[str, float]]] = {"selector": {}, "engine": {}}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(issubclass(t, DTensor) for t in types):
                # let DTensor run the op (e.g. FSDP2's grad-norm reduction): the collectives it issues
                # on the local tensors come back here (a mode sees ops before subclasses do, and the
                # ops it calls itself run with the mode off)
                return NotImplemented
            name = func.name() if hasattr(func, "name") else str(func)
            kind = _collective_kind(name)
            if kind is not None:
                functional = not name.startswith("c10d::")
                if kind == "all_gather":  # the gathered output
                    payload = _nbytes(args[0]) * int(args[1]) if functional else _nbytes(args[0])
                elif kind == "reduce_scatter":  # the full (unscattered) input
                    payload = _nbytes(args[0]) if functional else _nbytes(args[1])
                elif kind == "other":
                    payload = 0
                else:
                    payload = _nbytes(args[0])
                rec = self.by["selector" if _from_selector() else "engine"].setdefault(
                    kind, {"calls": 0, "bytes": 0, "ring_wire_bytes": 0.0})
                rec["calls"] += 1
                rec["bytes"] += payload
                rec["ring_wire_bytes"] += payload * _wire_factor(kind, world)
            return func(*args, **kwargs)

        def totals(self) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for source, kinds in self.by.items():
                out[source] = {"bytes": int(sum(r["bytes"] for r in kinds.values())),
                               "ring_wire_bytes": float(sum(r["ring_wire_bytes"] for r in kinds.values())),
                               "calls": int(sum(r["calls"] for r in kinds.values())),
                               "by_kind": {k: dict(v) for k, v in kinds.items()}}
            return out

    return CollectiveBytes()


# -- one rank ---------------------------------------------------------------------------------------

def _share(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def _subset(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def _worker(rank: int, world: int, engine_name: str, grams: list[str], s: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.speed import build_model, make_pool
    from optsel import distributed
    from optsel.pipeline.engines.base import EngineConfig, OptimizerConfig, build_engine
    from optsel.selection.ftw import FilterThenWeight, FTWConfig

    logging_quiet()
    device = torch.device("cpu")
    n, k, T = s["N"], s["k"], s["T"]
    model = build_model(device, max_pos=T, seed=0)
    num_params = sum(p.numel() for p in model.parameters())
    steps_total = s["warm_steps"] + len(grams) * (1 + s["repeats"] + 1) + 1
    engine = build_engine(EngineConfig(name=engine_name, deepspeed_config=str(ZERO3_JSON), precision="fp32"), model,
                          OptimizerConfig(lr=3e-3, betas=(0.9, 0.95), schedule="constant", grad_clip=1.0),
                          total_steps=steps_total, micro_batch_size=max(1, k // world))
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
    out: dict[str, Any] = {"rank": rank, "world": world, "engine": engine_name, "num_params": num_params,
                           "local_param_numel": per_rank_params, "threads": torch.get_num_threads(), "grams": {}}

    def one_step(ftw, pool, counted: bool):
        counter = collective_counter(world) if counted else None
        distributed.barrier()
        t0 = time.perf_counter()
        if counter is not None:
            with counter:
                sel = ftw.select(pool, target)
        else:
            sel = ftw.select(pool, target)
        t_select = time.perf_counter() - t0
        sel_counts = counter.totals() if counter is not None else None
        rows, weights = sel.local_indices, sel.local_weights.to(torch.float32)
        if rows.numel() == 0:  # keep the engines' collectives in step (as the trainer does)
            rows, weights = torch.zeros(1, dtype=torch.long), torch.zeros(1)
        counter2 = collective_counter(world) if counted else None
        distributed.barrier()
        if counter2 is not None:
            with counter2:
                t_train = train_step(_subset(pool, rows), weights)
        else:
            t_train = train_step(_subset(pool, rows), weights)
        return sel, t_select, t_train, sel_counts, (counter2.totals() if counter2 is not None else None)

    for gram in grams:
        backend, exchange = split_label(gram)
        ftw = FilterThenWeight(engine.unwrapped_model, engine.optimizer,
                               FTWConfig(budget=k, filter_ratio=0.5, gram=backend, exchange=exchange,
                                         geometry="adam", sketch_dim_out=s["sketch_dim"],
                                         sketch_dim_in=s["sketch_dim"]), seed=0)
        rec: dict[str, Any] = {"select_s": [], "train_s": [], "phases_s": [], "comm_bytes": [], "comm_by_op": [],
                               "comm_by_phase": [],
                               "comm_calls": [], "indices": [], "weights": [], "optimizer_step": [], "backends": None}
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


def split_label(label: str) -> tuple[str, str]:
    """'auto+direction' → ('auto', 'direction'); a bare backend is exchange 'factors'."""
    backend, _, exchange = label.partition("+")
    return backend, exchange or "factors"


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


def logging_quiet() -> None:
    import logging
    import warnings

    for name in ("optsel", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# -- spawning R ranks ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(rank, world, port, engine, threads, fn, args, env, results) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        from optsel import distributed

        distributed.init_distributed(engine, timeout_s=300.0, backend="gloo")
        try:
            value = fn(rank, world, *args)
        finally:
            distributed.destroy()
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, engine: str, args: tuple, threads: int, timeout_s: float) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo processes; results in rank order."""
    import torch.multiprocessing as mp

    from optsel.launch.launchers import deepspeed_shm_files, remove_files

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    procs = [ctx.Process(target=_child, args=(r, world, port, engine, threads, fn, args, env, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine} R={world}: timed out after {timeout_s:.0f} s")
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{engine} R={world}: rank(s) {dead} died "
                                       f"(exit codes {[procs[r].exitcode for r in dead]})")
                continue
            got[rank] = (status, payload)
            if status == "error":
                raise RuntimeError(f"{engine} R={world}: rank {rank} raised:\n{payload}")
        for p in procs:
            p.join(timeout=30)
        return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        remove_files(deepspeed_shm_files(port))


# -- summarizing ----------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return (ys[(len(ys) - 1) // 2] + ys[len(ys) // 2]) / 2 if ys else float("nan")


def summarize(ranks: list[dict], gram: str, settings: dict) -> dict:
    """One (engine, R, gram) row: slowest-rank mean times, rank-0 bytes (ranks agree: checked)."""
    world = ranks[0]["world"]
    recs = [r["grams"][gram] for r in ranks]
    phases = {p: max(_mean([ph.get(p, 0.0) for ph in rec["phases_s"]]) for rec in recs) for p in PHASES}
    r0 = recs[0]
    sel_dispatch = r0["dispatch_select"]
    train_dispatch = r0["dispatch_train"]
    alone = ranks[0]["dispatch_train_full_pool"]["engine"]
    P = ranks[0]["num_params"]
    analytic = 3 * P * 4
    comm = r0["comm_bytes"][0] if r0["comm_bytes"] else 0
    return {
        "engine": ranks[0]["engine"], "R": world, "gram": gram, "backends": r0["backends"],
        "select_s": max(_mean(rec["select_s"]) for rec in recs),
        "select_median_s": max(_median(rec["select_s"]) for rec in recs),
        "select_s_per_rank": [_mean(rec["select_s"]) for rec in recs],
        "train_step_s": max(_mean(rec["train_s"]) for rec in recs),
        "phases_s": phases,
        "phases_s_per_rank": [{p: _mean([ph.get(p, 0.0) for ph in rec["phases_s"]]) for p in PHASES} for rec in recs],
        "selector_bytes": comm,
        "selector_bytes_constant": all(len(set(rec["comm_bytes"])) <= 1 and rec["comm_bytes"] == r0["comm_bytes"]
                                       for rec in recs),
        "selector_by_op": r0["comm_by_op"][0] if r0["comm_by_op"] else {},
        "selector_by_phase": r0["comm_by_phase"][0] if r0.get("comm_by_phase") else {},
        "selector_calls": r0["comm_calls"][0] if r0["comm_calls"] else 0,
        "selector_ring_wire_bytes": sel_dispatch["selector"]["ring_wire_bytes"],
        "dispatch_selector_bytes": sel_dispatch["selector"]["bytes"],
        "commcounter_equals_dispatch": sel_dispatch["selector"]["bytes"] == r0["comm_bytes_counted_step"],
        "engine_bytes_during_select": sel_dispatch["engine"]["bytes"],
        "engine_ring_wire_bytes_during_select": sel_dispatch["engine"]["ring_wire_bytes"],
        "engine_select_by_kind": sel_dispatch["engine"]["by_kind"],
        # the training step on its own (no select before it): the engine's traffic per step
        "engine_bytes_train_step": alone["bytes"],
        "engine_ring_wire_bytes_train_step": alone["ring_wire_bytes"],
        "engine_train_by_kind": alone["by_kind"],
        # the training step right after select (parameters the capture left gathered may be reused)
        "engine_bytes_train_after_select": train_dispatch["engine"]["bytes"],
        "engine_train_after_select_by_kind": train_dispatch["engine"]["by_kind"],
        # what select adds to the engine's own traffic in one optimizer step
        "engine_extra_bytes_due_to_select": (sel_dispatch["engine"]["bytes"] + train_dispatch["engine"]["bytes"]
                                             - alone["bytes"]),
        "engine_extra_ring_wire_bytes_due_to_select": (sel_dispatch["engine"]["ring_wire_bytes"]
                                                       + train_dispatch["engine"]["ring_wire_bytes"]
                                                       - alone["ring_wire_bytes"]),
        "analytic_engine_bytes_train_step": analytic,
        "analytic_engine_ring_wire_bytes_train_step": analytic * _wire_factor("all_gather", world),
        "num_params": P, "local_param_numel": [r["local_param_numel"] for r in ranks],
        "factor_width": r0["factor_width"], "sketch_elems": r0["sketch_elems"],
        "indices": r0["indices"], "weights": r0["weights"],
        "ranks_agree": all(rec["indices"] == r0["indices"] and rec["weights"] == r0["weights"] for rec in recs),
        "optimizer_step": r0["optimizer_step"],
    }


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "—"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_select.json").write_text(jsonio.dumps(results, indent=2))
    meta, rows = results["meta"], results["rows"]
    L = [f"# Distributed FTW select: bytes and per-phase time, R = 1 vs R = 2 ({meta['mode']})", "",
         f"- date: {meta['date']}",
         f"- command: `{meta['command']}`",
         f"- machine: {meta['machine']}; {meta['cpu_count']} CPU cores, shared with other work "
         f"(load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end); "
         f"{meta['threads_per_rank']} intra-op thread(s) per rank; gloo over loopback",
         f"- torch {meta['torch']}, deepspeed {meta['deepspeed']}, transformers {meta['transformers']}, "
         f"python {meta['python']}",
         f"- model: demo-sized tiny Llama (hidden 64, 2 layers, vocab 259), P = {meta['num_params']:,} parameters "
         f"(fp32: {_fmt_bytes(meta['num_params'] * 4)}); AdamW after {meta['warm_steps']} warm-up optimizer steps",
         f"- FTW: global pool N = {meta['N']} (N/R per rank), budget k = {meta['k']}, filter_ratio 0.5 (m = "
         f"{meta['N'] // 2}), T = {meta['T']}, target {meta['num_target']} samples (refreshed every step), "
         f"geometry adam, {meta.get('sketch_dim', 32)}×{meta.get('sketch_dim', 32)} sketches; same global pools and target "
         f"for every R",
         f"- times: mean over {meta['repeats']} steps after 1 warm-up step (median of select too), slowest rank per "
         f"column; wall time of the whole benchmark {meta['wall_s']:.0f} s", ""]
    L += ["## (a) Selector bytes per step vs the engine's parameter traffic per step", "",
          "Per rank, per optimizer step. *payload*: bytes handed to collectives (CommCounter convention: "
          "all-gather = gathered output, reduce-scatter = full input, all-reduce/broadcast = the tensor). "
          "*ring wire*: what a ring algorithm sends per rank, payload × (R−1)/R (all-reduce × 2(R−1)/R); "
          "zero at R = 1. Selector = `comm_bytes` from optsel's CommCounter (measured). Engine = every "
          "collective the engine issued, counted by a TorchDispatchMode (measured): *train step* = "
          "forward_backward + step on its own; *during select* = the parameter gathers of FTW's capture "
          "forward/backward over pool and target; *extra due to select* = during select + train step after "
          "select − train step alone. Analytic = 3·P·4 bytes. Ratios are to the measured engine train step.", "",
          "| engine | R | gram | selector payload | selector ring wire | engine train step payload | "
          "engine train step ring wire | analytic 3·P·4 payload | analytic ring wire | engine during select "
          "(capture + target) | engine extra due to select | selector / engine | "
          "(selector + engine extra) / engine | same, ring wire |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sel_plus = r["selector_bytes"] + r["engine_extra_bytes_due_to_select"]
        wire_plus = r["selector_ring_wire_bytes"] + r["engine_extra_ring_wire_bytes_due_to_select"]
        L.append(f"| {r['engine']} | {r['R']} | {r['gram']} | {_fmt_bytes(r['selector_bytes'])} | "
                 f"{_fmt_bytes(r['selector_ring_wire_bytes'])} | {_fmt_bytes(r['engine_bytes_train_step'])} | "
                 f"{_fmt_bytes(r['engine_ring_wire_bytes_train_step'])} | "
                 f"{_fmt_bytes(r['analytic_engine_bytes_train_step'])} | "
                 f"{_fmt_bytes(r['analytic_engine_ring_wire_bytes_train_step'])} | "
                 f"{_fmt_bytes(r['engine_bytes_during_select'])} | "
                 f"{_fmt_bytes(r['engine_extra_bytes_due_to_select'])} | "
                 f"{_ratio(r['selector_bytes'], r['engine_bytes_train_step'])} | "
                 f"{_ratio(sel_plus, r['engine_bytes_train_step'])} | "
                 f"{_ratio(wire_plus, r['engine_ring_wire_bytes_train_step'])} |")
    L += ["", "Selector payload by collective (R = 2; one row per engine/gram):", "",
          "| engine | gram | calls | all_gather | all_reduce | broadcast | CommCounter = dispatch count |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["R"] < 2:
            continue
        ops = r["selector_by_op"]
        L.append(f"| {r['engine']} | {r['gram']} | {r['selector_calls']} | "
                 + " | ".join(_fmt_bytes(ops.get(o, 0)) for o in ("all_gather", "all_reduce", "broadcast"))
                 + f" | {'yes' if r['commcounter_equals_dispatch'] else 'NO'} |")
    cols = ("target", "gather", "alignment", "gram", "survivors", "solve", "other")
    L += ["", "Selector payload by FTW phase (R = 2; CommCounter.by_phase: *target* = target tokens / factors / "
              "sketch sums, *gather* = M (direction), every candidate's factors (factors) or sketches, rank-one "
              "r, c, the N scalars; *survivors* = the m survivors' sketches or factors (direction); *gram* = "
              "partial Gram all-reduces; *solve* = rank 0's choice broadcast):", "",
          "| engine | gram | " + " | ".join(cols) + " | total | total / engine train step |",
          "|---|---|" + "---|" * len(cols) + "---|---|"]
    for r in rows:
        if r["R"] < 2:
            continue
        ph = r.get("selector_by_phase", {})
        L.append(f"| {r['engine']} | {r['gram']} | " + " | ".join(_fmt_bytes(ph.get(c, 0)) for c in cols)
                 + f" | {_fmt_bytes(r['selector_bytes'])} | {_ratio(r['selector_bytes'], r['engine_bytes_train_step'])} |")
    L += ["", "Engine collectives, payload (calls), R = 2: a training step on its own, during one select, and the "
              "training step right after that select (identical for every gram backend: shown for the first):", "",
          "| engine | gram | where | " + " | ".join(("all_gather", "reduce_scatter", "all_reduce", "broadcast")) + " |",
          "|---|---|---|---|---|---|---|"]
    shown = set()
    for r in rows:
        if r["R"] < 2 or r["engine"] in shown:
            continue
        shown.add(r["engine"])
        for where, kinds in (("train step alone", r["engine_train_by_kind"]),
                             ("select (capture + target)", r["engine_select_by_kind"]),
                             ("train step after select", r["engine_train_after_select_by_kind"])):
            cells = [f"{_fmt_bytes(kinds[k]['bytes'])} ({kinds[k]['calls']})" if k in kinds else "—"
                     for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast")]
            L.append(f"| {r['engine']} | {r['gram']} | {where} | " + " | ".join(cells) + " |")
    L += ["", "## (b) Per-phase time of FTW select, R = 1 vs R = 2 (ms, slowest rank)", "",
          "| engine | gram | R | select (mean) | select (median) | " + " | ".join(PHASES)
          + " | train step | R=2 / R=1 select (mean) | same selection as R=1 |",
          "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|"]
    base = {(r["engine"], r["gram"]): r for r in rows if r["R"] == 1}
    for r in rows:
        b = base.get((r["engine"], r["gram"]))
        same = "—" if b is None or r["R"] == 1 else ("yes" if r["indices"] == b["indices"] else "no")
        L.append(f"| {r['engine']} | {r['gram']} | {r['R']} | {r['select_s'] * 1e3:.1f} | "
                 f"{r['select_median_s'] * 1e3:.1f} | "
                 + " | ".join(f"{r['phases_s'][p] * 1e3:.1f}" for p in PHASES)
                 + f" | {r['train_step_s'] * 1e3:.1f} | "
                 + (_ratio(r['select_s'], b['select_s']) if b is not None and r["R"] != 1 else "—") + f" | {same} |")
    L += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    (out / "distributed_select.md").write_text("\n".join(L) + "\n")


def notes(rows: list[dict], meta: dict) -> list[str]:
    """What the tables mean and what they show (numbers taken from the rows)."""
    out = [
        "How each number was obtained. Selector bytes: optsel's CommCounter (`Selection.diagnostics['comm_bytes']`), "
        "measured; during one extra counted step a TorchDispatchMode also counted every collective issued from "
        "optsel/distributed.py, and the two agree where the breakdown table says 'yes'. Engine bytes: measured by "
        "the same TorchDispatchMode (every `torch.ops.c10d.*` and `torch.ops._c10d_functional.*` collective the "
        "engine issued, in the CommCounter's payload convention). 'Analytic' = 3·P·4 bytes (all-gather in forward, "
        "again in backward, reduce-scatter of gradients; fp32), for comparison only. Ring-wire columns are "
        "payload × (R−1)/R (all-reduce 2(R−1)/R): an estimate of what a ring algorithm sends per rank, not a "
        "measurement of gloo's traffic.",
        "Capture traffic: FTW's capture runs its own forward (and an autograd.grad to the covered layers' outputs) "
        "over the rank's pool and over the target, so the sharded engine all-gathers parameters during `select`; "
        "these collectives are not in `comm_bytes`. 'engine during select' counts them; 'engine extra due to "
        "select' = engine bytes during select + in the training step that follows − in a training step on its own "
        "(ZeRO-3 can reuse parameters the capture left gathered, so the training step after a select may gather "
        "less than one on its own).",
        "Why the measured engine traffic is below 3·P·4: FSDP2 does not reshard the root module (embeddings, final "
        "norm, lm_head) after forward, so backward re-gathers only the decoder layers; configs/deepspeed/zero3.json "
        "sets stage3_max_live_parameters and stage3_max_reuse_distance to 1e9, so ZeRO-3 keeps what it gathered in "
        "forward until backward (one all-gather per parameter per step), and parameters below "
        "stage3_param_persistence_threshold (10·hidden = 640 elements: the norms) are never partitioned. At R = 1 "
        "FSDP2 issues no collectives at all; DeepSpeed still calls its reduce-scatters on a world of one (payload "
        "counted, 0 on the wire). The selector issues nothing at R = 1 (its collectives are no-ops).",
    ]
    two = [r for r in rows if r["R"] >= 2 and split_label(r["gram"])[1] == "factors"]
    light = [r for r in rows if r["R"] >= 2 and split_label(r["gram"])[1] == "sketches"]
    direction = [r for r in rows if r["R"] >= 2 and split_label(r["gram"])[1] == "direction"]
    if two:
        r = two[0]
        n, nt, T, W = meta["N"], meta["num_target"], meta["T"], r["factor_width"]
        factors = (n + nt) * T * W * 4
        ratios = [r2["selector_bytes"] / r2["engine_bytes_train_step"] for r2 in two if r2["engine_bytes_train_step"]]
        out.append(
            f"With exchange='factors' FTW all-gathers the full factors (A, Δ) "
            f"of every pool and target sample whatever the Gram backend: "
            f"(N + N_target) · T · Σ_l(d_in + d_out) · 4 B = ({n} + {nt}) · {T} · {W} · 4 B = {_fmt_bytes(factors)} "
            f"(analytic) of the measured {_fmt_bytes(r['selector_bytes'])}; the sketch backend gathers its sketches "
            f"on top. That is {min(ratios):.0f}–{max(ratios):.0f}× the engine's measured per-step traffic, and it "
            f"grows with model size too: ≈ 2·N·T / (3·d) for square d × d layers (N = 64, T = 2048, d = 4096: ≈ 21×).")
    if light:
        r = light[0]
        ratios = [r2["selector_bytes"] / r2["engine_bytes_train_step"] for r2 in light if r2["engine_bytes_train_step"]]
        out.append(
            f"With exchange='sketches' ('+sketches' rows) only sketches cross ranks: N · Σ_l k_o·k_i "
            f"floats all-gathered plus O(Σ_l (d_in + d_out + 2·k_o·k_i)) all-reduced: {_fmt_bytes(r['selector_bytes'])} "
            f"here, {min(ratios):.1f}–{max(ratios):.1f}× the engine's traffic of this 107k-parameter model (one "
            f"sample's {meta['sketch_dim']}×{meta['sketch_dim']} sketch per layer against a 64×64 layer). It does not grow with T or d: for a "
            f"7B Llama (224 linear layers, bf16 parameter traffic ≈ 3 · 6.7e9 · 2 B ≈ 40 GB per step) the same "
            f"N = 64, 32×32 sketches are 64 · 224 · 1024 · 4 B ≈ 59 MB ≈ 0.15 % (analytic), inside docs/design.md §4's 1 %. "
            f"The price is a sketched alignment b (see tests/test_ftw_math.py and the quality benchmark's "
            f"ftw_sketch_exchange row).")
    for r in direction:
        ph = r.get("selector_by_phase", {})
        out.append(
            f"{r['engine']} {r['gram']} (exchange='direction', the default; b exact): "
            f"{_fmt_bytes(r['selector_bytes'])} per step = {_ratio(r['selector_bytes'], r['engine_bytes_train_step'])} "
            f"the engine's measured train-step traffic; of it, gather (M = P ⊙ (G_V − ρ m̂) of every covered layer, "
            f"fp32, gathered like the weight{', and P for the exact Gram' if r['gram'].startswith('exact') else ''}; "
            f"rank-one r, c; N × (b, diag K, tokens)) {_fmt_bytes(ph.get('gather', 0))}, survivors' "
            f"{'factors' if r['gram'].startswith('exact') else 'sketches'} {_fmt_bytes(ph.get('survivors', 0))}, "
            f"target token ids {_fmt_bytes(ph.get('target', 0))}. Backends: {sorted(set(r['backends'].values()))}. "
            f"{'Auto picks by FLOPs on one process (no bytes to weigh) and at a reference R = 8 on R ≥ 2, so its R = 1 and R = 2 backends, hence selections, may differ by design. ' if r['gram'].startswith('auto') else ''}"
            f"The survivors' share varies from step to step with the number of survivors (u > 0, at most m) "
            f"and their split over ranks (the all-gather pads to the larger share).")
    bad = [f"{r['engine']} R={r['R']} {r['gram']}" for r in rows if not r["ranks_agree"]]
    if bad:
        out.append(f"Ranks returned different selections in: {', '.join(bad)} (should never happen).")
    changing = [f"{r['engine']} R={r['R']} {r['gram']}" for r in rows if not r["selector_bytes_constant"]]
    if changing:
        out.append(f"comm_bytes varied between steps or ranks in: {', '.join(changing)} "
                   "(the table shows rank 0's first step).")
    mismatch = [f"{r['engine']} R={r['R']} {r['gram']}" for r in rows
                if r["R"] > 1 and not r["commcounter_equals_dispatch"]]
    if mismatch:
        out.append(f"CommCounter and the dispatch count of optsel's collectives differ in: {', '.join(mismatch)}.")
    out.append(
        f"Times: every rank has {meta['threads_per_rank']} intra-op thread(s); R = 2 puts two ranks on the "
        f"machine's {meta['cpu_count']} CPU cores, which other jobs were using at the same time (see the load "
        "average above), and gloo moves the gathered factors through loopback TCP. Each rank captures only N/R "
        "samples, but the gather, alignment and Gram phases then work on the whole gathered pool on every rank "
        "(partial sums over the rank's own moment shard, on all N candidates), so R = 2 adds the all-gather and "
        "saves little compute; with two single-thread ranks competing with other work for 2 cores, R = 2 being no "
        "faster, or slower, than R = 1 is expected and says nothing about GPUs with fast interconnects. Per-rank "
        "times are in the JSON.")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=16, k=4, T=32, 2 repeats, gram auto only")
    parser.add_argument("--out", default=None, help="default: results/distributed_select (quick: ..._quick)")
    parser.add_argument("--engines", default="fsdp2,deepspeed")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--grams", default=None, help="comma list of <gram backend>+<exchange> (default: "
                        "exact+direction,sketch+sketches,auto+factors,auto+direction; a bare backend: +factors)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sketch-dim", type=int, default=16,
                        help="k_o = k_i of every sketch (default 16: 1/4 of this 64-wide model's layers; FTWConfig's "
                             "default 32 is 1/128 of a 4096-wide layer)")
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
                print(f"[distributed_select] {engine:9s} R={R} {gram:6s} select {r['select_s'] * 1e3:7.1f} ms  "
                      f"selector {_fmt_bytes(r['selector_bytes'])}  engine/train step "
                      f"{_fmt_bytes(r['engine_bytes_train_step'])}  engine during select "
                      f"{_fmt_bytes(r['engine_bytes_during_select'])}  ({time.time() - t0:.0f} s)", flush=True)
    import deepspeed
    import transformers

    meta = {"mode": "quick" if args.quick else "default",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python -m benchmarks.distributed_select",
                                 *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))]),
            "machine": " ".join(x for x in (platform.machine(), platform.processor(), platform.system(),
                                            platform.release()) if x),
            "cpu_count": os.cpu_count(), "loadavg_start": load_start,
            "loadavg_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
            "threads_per_rank": args.threads_per_rank, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "num_params": rows[0]["num_params"] if rows else 0, "engines": engines, "ranks": ranks, "grams": grams,
            "wall_s": time.time() - start, **s}
    results = {"meta": meta, "rows": rows}
    results["notes"] = notes(rows, meta)
    out = Path(args.out or ("results/distributed_select_quick" if args.quick else "results/distributed_select"))
    write(results, out)
    print((out / "distributed_select.md").read_text())
    return results


if __name__ == "__main__":
    main()
