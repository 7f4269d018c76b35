"""Benchmark plumbing for multi-rank runs: spawn R gloo processes on this machine (benchmarks.local_ranks,
the tests' spawner too) and count every collective they issue (bytes and calls by kind, as a
TorchDispatchMode sees them), so that measured bytes do not depend on who called the collective."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

# -- counting every collective ----------------------------------------------------------------------


def _collective_kind(name: str) -> str | None:
    """'all_gather' | 'reduce_scatter' | 'all_reduce' | 'broadcast' | 'other' for a collective op
    name (c10d::allgather_, _c10d_functional::all_reduce, ...), None for anything else."""
    if not name.startswith(("c10d::", "_c10d_functional::", "c10d_functional::")):
        return None
    op = name.split("::", 1)[1].split(".")[0].replace("_", "")
    if op.startswith("wait") or op in ("barrier", "monitoredbarrier"):
        return "other" if op.startswith("barrier") or op.startswith("monitored") else None
    for key, kind in (
        ("allgather", "all_gather"),
        ("reducescatter", "reduce_scatter"),
        ("allreduce", "all_reduce"),
        ("broadcast", "broadcast"),
    ):
        if key in op:
            return kind
    if op in (
        "send",
        "recv",
        "recvanysource",
        "gather",
        "scatter",
        "reduce",
        "alltoall",
        "alltoallbase",
        "alltoallsingle",
    ):
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


def wire_factor(kind: str, world: int) -> float:
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
                    kind, {"calls": 0, "bytes": 0, "ring_wire_bytes": 0.0}
                )
                rec["calls"] += 1
                rec["bytes"] += payload
                rec["ring_wire_bytes"] += payload * wire_factor(kind, world)
            return func(*args, **kwargs)

        def totals(self) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for source, kinds in self.by.items():
                out[source] = {
                    "bytes": int(sum(r["bytes"] for r in kinds.values())),
                    "ring_wire_bytes": float(sum(r["ring_wire_bytes"] for r in kinds.values())),
                    "calls": int(sum(r["calls"] for r in kinds.values())),
                    "by_kind": {k: dict(v) for k, v in kinds.items()},
                }
            return out

    return CollectiveBytes()


def logging_quiet() -> None:
    import logging
    import warnings

    for name in ("optsel", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# -- spawning R ranks ---------------------------------------------------------------------------------


def run_ranks(fn: Callable[..., Any], world: int, engine: str, args: tuple, threads: int, timeout_s: float) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo processes joined by ``engine``; results in rank
    order (benchmarks.local_ranks; errors name the engine and R)."""
    from benchmarks.local_ranks import LocalRanksError, RankSetup, run_local_ranks

    try:
        return run_local_ranks(
            fn,
            world,
            args=args,
            init=engine,
            timeout_s=timeout_s,
            setup=RankSetup(threads=threads, init_timeout_s=300.0, env={"TOKENIZERS_PARALLELISM": "false"}),
        )
    except LocalRanksError as err:
        raise RuntimeError(f"{engine} R={world}: {err}") from err
