"""``optsel launch``: start N ranks of ``optsel.launch.train`` with torchrun or the deepspeed launcher.

Single node by default; ``--nnodes/--node-rank/--master-addr`` give the multi-node form (run the
same command on every node; the master port then defaults to 29500, since every node must name the
same one). The deepspeed launcher refuses ``--num_nodes`` > 1 without a hostfile even with ``--no_ssh``:
without ``--hostfile`` one listing ``node0 .. node<N-1>`` is written for the run (with ``--no_ssh`` the
names are only labels; the node order gives the node rank). The deepspeed launcher on CPU leaves
``/dev/shm/deepspeed_allreduce_buffer_*`` files behind (see STACK notes): the ones created by this
launch are removed when it ends.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer*"
MULTI_NODE_PORT = 29500


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (as ``optsel.distributed.free_port``, which this process does not
    import: that module imports torch, ~3 s before the launcher could start the ranks, which import it
    themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Nodes:
    """Where this node sits in a multi-node job: ``nnodes`` nodes, this one ``node_rank``, the rendezvous at
    ``master_addr:master_port`` (None: a free local port for one node, MULTI_NODE_PORT for several), and the
    deepspeed launcher's ``hostfile`` (required by it when ``nnodes`` > 1: one ``NAME slots=N`` line per node,
    see ``write_hostfile``)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    hostfile: str | None = None


def build_command(launcher: str, nproc: int, config: str, overrides: list[str], nodes: Nodes = Nodes()) -> list[str]:
    """The argv that starts ``nproc`` local ranks of training with ``launcher`` on this node of ``nodes``."""
    nnodes, node_rank, master_addr, hostfile = nodes.nnodes, nodes.node_rank, nodes.master_addr, nodes.hostfile
    master_port = nodes.master_port
    port = str(master_port or (MULTI_NODE_PORT if nnodes > 1 else free_port()))
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            f"--master_addr={master_addr}",
            f"--master_port={port}",
            "-m",
            "optsel.launch.train",
            config,
            *overrides,
        ]
    if launcher == "deepspeed":
        deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
        if deepspeed is None:
            raise FileNotFoundError("the deepspeed launcher is not on PATH (pip install deepspeed)")
        cmd = [deepspeed, f"--num_gpus={nproc}", f"--master_addr={master_addr}", f"--master_port={port}"]
        if nnodes > 1:  # no ssh: each node runs the launcher itself (a hostfile is still required)
            if hostfile is None:
                raise ValueError("the deepspeed launcher needs a hostfile for --num_nodes > 1 (see write_hostfile)")
            cmd += ["--hostfile", hostfile, "--no_ssh", f"--num_nodes={nnodes}", f"--node_rank={node_rank}"]
        return cmd + ["--module", "optsel.launch.train", config, *overrides]
    raise ValueError(f"launcher: expected torchrun or deepspeed, got {launcher!r}")


def write_hostfile(nnodes: int, slots: int) -> str:
    """A temporary deepspeed hostfile ``node0 slots=N`` .. ``node<nnodes-1> slots=N``; returns its path."""

    fd, path = tempfile.mkstemp(prefix="optsel-hostfile-")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"node{i} slots={slots}\n" for i in range(nnodes))
    return path


def deepspeed_shm_files(port: int | None = None, addr: str = "127.0.0.1") -> set[str]:
    """DeepSpeed's CPU shm all-reduce buffers, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>:
    every one, or those of this user's job on ``addr:port``."""
    pattern = SHM_PATTERN if port is None else f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"
    return set(glob.glob(pattern))


def remove_files(paths: set[str]) -> None:
    """Remove ``paths``, ignoring ones already gone."""
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    """Run a launch command; remove the deepspeed shm buffers it created. Returns its exit code."""
    before = deepspeed_shm_files()
    try:
        return subprocess.run(cmd, env=env, timeout=timeout, check=False).returncode
    finally:
        remove_files(deepspeed_shm_files() - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optsel launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this node")
    parser.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument(
        "--master-port",
        type=int,
        default=None,
        help=f"default: a free port on one node, {MULTI_NODE_PORT} with --nnodes > 1",
    )
    parser.add_argument(
        "--hostfile", default=None, help="deepspeed with --nnodes > 1: its hostfile (default: one written for the run)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="pass --resume to every rank (newest complete checkpoint, or start fresh)"
    )
    parser.add_argument("--resume-from", default=None, metavar="CHECKPOINT", help="pass --resume-from to every rank")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="pass --overwrite to every rank (move an earlier run's checkpoints aside)",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="pass --allow-unsigned to every rank (resume a signed checkpoint without the key)",
    )
    parser.add_argument(
        "--allow-other-data",
        action="store_true",
        help="pass --allow-other-data to every rank (resume a checkpoint made from other data)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="pass --verbose to every rank (all warnings, DEBUG logs)"
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.verbose:
        args.overrides = [*args.overrides, "--verbose"]
    if args.resume or args.resume_from:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume_from or 'auto'}"]
    if args.overwrite:
        args.overrides = [*args.overrides, "checkpoint.overwrite=true"]
    if args.allow_unsigned:
        args.overrides = [*args.overrides, "checkpoint.allow_unsigned=true"]
    if args.allow_other_data:
        args.overrides = [*args.overrides, "checkpoint.allow_other_data=true"]
    hostfile, written = args.hostfile, None
    if args.launcher == "deepspeed" and args.nnodes > 1 and hostfile is None:
        hostfile = written = write_hostfile(args.nnodes, args.nproc)
    try:
        cmd = build_command(
            args.launcher,
            args.nproc,
            args.config,
            args.overrides,
            Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port, hostfile),
        )
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        return run(cmd)
    finally:
        if written is not None:
            os.remove(written)
