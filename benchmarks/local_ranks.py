"""Run a function on R local processes joined in a real process group (gloo by default) and collect
what each rank returns: the one spawner behind the multi-rank tests (tests/support/dist.py) and the
multi-rank benchmarks (benchmarks/ranks.py).

    from benchmarks.local_ranks import run_local_ranks

    def body(rank: int, world_size: int, scale: float) -> torch.Tensor:   # module level: picklable
        return distributed.all_reduce_sum(torch.tensor([rank * scale]))

    results = run_local_ranks(body, world_size=2, args=(2.0,))           # [rank 0's, rank 1's]

Each child process (``spawn``) gets the torchrun-style environment (MASTER_ADDR=127.0.0.1, a free
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), ``threads`` intra-op threads, and, unless
``init=None``, a process group joined through ``optsel.distributed.init_distributed(init)``
("torch" → ``init_process_group``; "deepspeed" → ``deepspeed.init_distributed``). It runs
``fn(rank, world_size, *args)``, and the return value comes back via ``torch.save`` bytes (tensors
included). An exception in any rank is re-raised with every rank's traceback; a rank that dies silently
or a run that exceeds ``timeout_s`` raises (and the children are killed) instead of hanging. DeepSpeed's
CPU shm all-reduce files for this run's port are removed.
"""

from __future__ import annotations

import io
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.multiprocessing as mp

from optsel.launch.launchers import deepspeed_shm_files, remove_files

TORCH_EXTENSIONS_DIR = str(Path.home() / ".cache" / "optsel" / "torch_extensions")


class LocalRanksError(RuntimeError):
    """A rank raised, died or timed out."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RankSetup:
    """How each rank's process is set up: ``backend`` of the process group, ``threads`` intra-op threads
    (also OMP_NUM_THREADS), ``init_timeout_s`` the process group's collective timeout (seconds), ``env``
    extra environment variables."""

    backend: str = "gloo"
    threads: int = 1
    init_timeout_s: float = 120.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Child:
    """What a spawned rank needs besides its rank: the world, the rendezvous port, the engine to join."""

    world_size: int
    port: int
    init: str | None
    setup: RankSetup


def _child(rank: int, child: _Child, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    world_size, port, init, setup = child.world_size, child.port, child.init, child.setup
    backend, threads, init_timeout_s, env = setup.backend, setup.threads, setup.init_timeout_s, setup.env
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        from optsel import distributed

        if init is not None:
            distributed.init_distributed(init, timeout_s=init_timeout_s, backend=backend)
        try:
            value = fn(rank, world_size, *args)
        finally:
            if init is not None:
                distributed.destroy()
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple = (),
    init: str | None = "torch",
    timeout_s: float = 120.0,
    setup: RankSetup | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results in
    rank order. ``fn`` and ``args`` must be picklable (``fn`` defined at module level).

    init: engine name passed to ``optsel.distributed.init_distributed`` ("torch", "fsdp2",
        "deepspeed"), or None to leave the process group to ``fn``.
    timeout_s: wall-clock limit for the whole run (spawn + fn), seconds.
    setup: backend, threads, collective timeout and extra environment of every rank (:class:`RankSetup`;
        ``TORCH_EXTENSIONS_DIR`` defaults to ~/.cache/optsel/torch_extensions so DeepSpeed's compiled ops are
        cached between runs).
    """
    setup = setup or RankSetup()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    child_env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR),
        "OMP_NUM_THREADS": str(setup.threads),
        **setup.env,
    }
    child = _Child(world_size, port, init, RankSetup(setup.backend, setup.threads, setup.init_timeout_s, child_env))
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, child, fn, args, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    got: dict[int, tuple[str, bytes | str]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            if time.monotonic() > deadline:
                raise LocalRanksError(
                    f"timed out after {timeout_s:.0f} s; ranks {sorted(got)} finished, "
                    f"{_errors(got) or 'no errors reported'}"
                )
            try:
                rank, status, payload = results.get(timeout=0.5)
                got[rank] = (status, payload)
                if status == "error":  # the others are probably stuck in a collective: fail soon,
                    _drain(results, got, world_size, grace_s=3.0)  # with every rank's error (root cause too)
                    break
            except queue.Empty:
                dead = [p for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # a message may still be in flight
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        got[rank] = (status, payload)
                    missing = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                    if missing:
                        raise LocalRanksError(
                            f"rank(s) {missing} died with exit code(s) {[procs[r].exitcode for r in missing]}; "
                            f"{_errors(got) or 'no errors reported'}"
                        ) from None
        errors = _errors(got)
        if errors:
            raise LocalRanksError(errors)
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        # no rank reported an error, so every payload is its pickled result (bytes)
        return [torch.load(io.BytesIO(cast(bytes, got[r][1])), weights_only=False) for r in range(world_size)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        results.close()
        remove_files(deepspeed_shm_files(port))


def _drain(results: Any, got: dict[int, tuple[str, Any]], world_size: int, grace_s: float) -> None:
    """Collect what other ranks report within ``grace_s`` seconds (e.g. the rank that raised first,
    when a peer's collective failed before its message arrived)."""
    end = time.monotonic() + grace_s
    while len(got) < world_size and time.monotonic() < end:
        try:
            rank, status, payload = results.get(timeout=max(0.05, end - time.monotonic()))
        except queue.Empty:
            return
        got[rank] = (status, payload)


def _errors(got: dict[int, tuple[str, Any]]) -> str:
    return "\n".join(
        f"--- rank {r} raised ---\n{payload}" for r, (status, payload) in sorted(got.items()) if status == "error"
    )


__all__ = ["LocalRanksError", "TORCH_EXTENSIONS_DIR", "run_local_ranks"]
