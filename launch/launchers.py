"""``optsel launch``: start N ranks of ``optsel.launch.train`` with torchrun or the deepspeed launcher.

Single node by default; ``--nnodes/--node-rank/--master-addr`` give the multi-node form (run the
same command on every node). The deepspeed launcher on CPU leaves
``/dev/shm/deepspeed_allreduce_buffer_*`` files behind (see STACK notes): the ones created by this
launch are removed when it ends.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

from optsel.distributed import free_port

SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer*"


def build_command(launcher: str, nproc: int, config: str, overrides: list[str], *, nnodes: int = 1,
                  node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int | None = None) -> list[str]:
    """The argv that starts ``nproc`` local ranks of training with ``launcher``."""
    port = str(master_port or free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
                f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={port}",
                "-m", "optsel.launch.train", config, *overrides]
    if launcher == "deepspeed":
        deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
        if deepspeed is None:
            raise FileNotFoundError("the deepspeed launcher is not on PATH (pip install deepspeed)")
        cmd = [deepspeed, f"--num_gpus={nproc}", f"--master_addr={master_addr}", f"--master_port={port}"]
        if nnodes > 1:  # no hostfile/ssh: each node runs the launcher itself
            cmd += ["--no_ssh", f"--num_nodes={nnodes}", f"--node_rank={node_rank}"]
        return cmd + ["--module", "optsel.launch.train", config, *overrides]
    raise ValueError(f"launcher: expected torchrun or deepspeed, got {launcher!r}")


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    """Run a launch command; remove the deepspeed shm buffers it created. Returns its exit code."""
    before = set(glob.glob(SHM_PATTERN))
    try:
        return subprocess.run(cmd, env=env, timeout=timeout, check=False).returncode
    finally:
        for path in set(glob.glob(SHM_PATTERN)) - before:
            try:
                os.remove(path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optsel launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this node")
    parser.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cmd = build_command(args.launcher, args.nproc, args.config, args.overrides, nnodes=args.nnodes,
                        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return run(cmd)
