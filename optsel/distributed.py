"""All of optsel's distributed plumbing in one place.

Process-group setup for the launchers (one process, torchrun, the ``deepspeed`` launcher, SLURM),
rank information, and the few collectives that selection and training use, each counting the
bytes it moves (``CommCounter``) so that the selector's communication is measured, not estimated.
Everything degrades to a no-op on a single process without a process group.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def info() -> DistInfo:
    """Rank information of the current process (from the process group, else the environment)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = _env_int("RANK", "SLURM_PROCID", default=0)
        world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(engine: str, timeout_s: float = 600.0, backend: str | None = None) -> DistInfo:
    """Join the job's process group (idempotent).

    engine: "deepspeed" uses ``deepspeed.init_distributed`` (which reads the launcher's env, incl.
    SLURM/MPI); anything else uses ``torch.distributed.init_process_group`` (env:// rendezvous,
    as torchrun sets it). A single process without launcher env starts a world of size 1 on a free
    loopback port so that the engines, which always expect a process group, still work.
    timeout_s bounds every collective: a lost rank ends the job instead of hanging it.
    """
    if dist.is_initialized():
        return info()
    backend = backend or default_backend()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain srun, no torchrun
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if os.environ.get("WORLD_SIZE", "1") == "1":  # one process, maybe with RANK but no rendezvous address
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(info().local_rank)
    if engine == "deepspeed":
        import deepspeed  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        device_id = torch.device("cuda", info().local_rank) if backend == "nccl" else None
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    return info()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class CommCounter:
    """Bytes handed to collectives (payload per rank: all-reduce/broadcast count the tensor once,
    all-gather counts the gathered output, padding included), and the number of calls. Every
    collective a counted helper issues is counted, including ``all_gather_cat``'s size exchange."""

    bytes: int = 0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    by_phase: dict[str, int] = field(default_factory=dict)
    phase: str = "other"  # the phase the caller is in (FTW sets it per phase): bytes are also kept by phase

    def add(self, op: str, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + int(nbytes)
        self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + int(nbytes)

    def reset(self) -> None:
        self.bytes, self.calls, self.by_op, self.by_phase, self.phase = 0, 0, {}, {}, "other"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType, counter: CommCounter | None) -> torch.Tensor:
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device(t)).contiguous().clone()
    dist.all_reduce(buf, op=op)
    if counter is not None:
        counter.add("all_reduce", _nbytes(buf))
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor on t's device; t is left unchanged)."""
    return _all_reduce(t, dist.ReduceOp.SUM, counter)


def all_reduce_max(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Elementwise max of ``t`` over ranks (a new tensor on t's device)."""
    return _all_reduce(t, dist.ReduceOp.MAX, counter)


def gather_sizes(n: int, counter: CommCounter | None = None) -> list[int]:
    """Every rank's local count ``n`` (e.g. pool size), in rank order (one int64 per rank; counted
    as an all-gather of 8 · R bytes when a counter is given)."""
    if not is_distributed():
        return [int(n)]
    local = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device(torch.empty(0)))
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    if counter is not None:
        counter.add("all_gather", sum(_nbytes(o) for o in out))
    return [int(x.item()) for x in out]


def all_gather_cat(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order; dim 0 may differ across ranks,
    the other dims must agree. Returns a tensor on t's device."""
    if not is_distributed():
        return t.clone()
    device = _comm_device(t)
    sizes = gather_sizes(t.shape[0], counter)  # the size exchange is a collective too: counted
    longest = max(sizes)
    buf = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    buf[: t.shape[0]] = t.detach().to(device)
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf)
    if counter is not None:  # what the collective moves: every rank's buffer, padded to the longest
        counter.add("all_gather", sum(_nbytes(o) for o in out))
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


def broadcast(t: torch.Tensor, src: int = 0, counter: CommCounter | None = None) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (same shape and dtype expected everywhere)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(t)).contiguous().clone()
    dist.broadcast(buf, src=src)
    if counter is not None:
        counter.add("broadcast", _nbytes(buf))
    return buf.to(t.device)


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_PEER_FAILURE_HINTS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl communicator was aborted",
    "connection refused",
    "socket closed",
)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or hung (gloo
    "Connection closed by peer", NCCL abort, a collective timeout) rather than a bug in this rank."""
    if not is_distributed():
        return False
    dist_errors = tuple(
        getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, name)
    )
    text = str(err).lower()
    return isinstance(err, dist_errors) or (
        isinstance(err, RuntimeError) and any(h in text for h in _PEER_FAILURE_HINTS)
    )


def all_gather_equal(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 when every rank passes the same shape (no size
    exchange, unlike ``all_gather_cat``). Returns a tensor on t's device."""
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device(t)).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    if counter is not None:
        counter.add("all_gather", sum(_nbytes(o) for o in out))
    return torch.cat(out).to(t.device)


def gather_shard0(
    local: torch.Tensor, like: torch.Tensor, shape: tuple[int, int], counter: CommCounter | None = None
) -> torch.Tensor:
    """The whole [d0, d1] tensor from every rank's ``Shard(0)`` row block ``local``, sharded like the
    FSDP2 DTensor parameter ``like`` (its 1-D mesh; torch's chunk rule): a DTensor redistribute
    Shard(0) → Replicate, the engine's own parameter all-gather. Counted as the gathered output,
    padding included (R · ceil(d0 / R) · d1 elements: what the collective moves)."""

    mesh = cast(DTensor, like).device_mesh
    d0, d1 = int(shape[0]), int(shape[1])
    if mesh.size() == 1:  # nothing to gather (and nothing counted, like the other collectives on one rank)
        return local.reshape(d0, d1).clone()
    dt = DTensor.from_local(
        local.contiguous(), mesh, [Shard(0)], run_check=False, shape=torch.Size((d0, d1)), stride=(d1, 1)
    )
    full = dt.redistribute(mesh, [Replicate()]).to_local()
    if counter is not None:
        world = mesh.size()
        counter.add("all_gather", world * -(-d0 // world) * d1 * local.element_size())
    return full
