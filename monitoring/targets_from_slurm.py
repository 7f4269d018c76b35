"""Write a Prometheus file_sd target file for an optsel job from SLURM or a DeepSpeed hostfile.

    python -m optsel.monitoring.targets_from_slurm --out /shared/prom/targets/optsel-$SLURM_JOB_ID.json \\
        --port 9477 [--per-rank-endpoints --ranks-per-node 8] [--hostfile hostfile] [--label team=nlp]

Hosts come from ``--hostfile`` (DeepSpeed format: ``host slots=N`` per line, ``#`` comments), else from
``$SLURM_JOB_NODELIST`` expanded by ``scontrol show hostnames`` (or, without scontrol, by a parser
of the common ``node[01-03,07],gpu5`` syntax). Rank 0 runs on the first host and serves the job-level
endpoint on ``--port``; with ``--per-rank-endpoints`` every host serves ``port + local_rank`` for each
of its ranks (slots from the hostfile, else ``--ranks-per-node`` / ``$SLURM_NTASKS_PER_NODE``).
Prometheus picks the file up by itself (see monitoring/prometheus/scrape-file-sd.yml); the file is
written atomically. Target labels: ``optsel_job`` (``$SLURM_JOB_ID`` or --job) and any ``--label``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from optsel.monitoring.exposition import _atomic_write, _hostport

DEFAULT_PORT = 9477


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed hostfile → [(host, slots)]. A line without ``slots=`` counts 1 slot."""
    hosts: list[tuple[str, int]] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 1
        for part in parts[1:]:
            if part.startswith("slots="):
                try:
                    slots = int(part.removeprefix("slots="))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: bad slots value in {line!r}") from None
        if slots < 1:
            raise ValueError(f"{path}:{lineno}: slots must be >= 1 in {line!r}")
        hosts.append((parts[0], slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts in hostfile")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist → host names, via ``scontrol show hostnames`` when present."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()
    return _expand_hostlist(nodelist)


def _expand_hostlist(nodelist: str) -> list[str]:
    """Pure-Python fallback for ``prefix[01-03,07]suffix`` groups separated by commas (one bracket
    group per name, which covers what SLURM prints for ordinary clusters)."""
    hosts: list[str] = []
    for name in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", name)
        if not match:
            hosts.append(name)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"SLURM nodelist {nodelist!r}: bad range {part!r}")
            hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def build_targets(
    hosts: list[tuple[str, int]], port: int, per_rank_endpoints: bool, labels: dict[str, str]
) -> list[dict]:
    """file_sd groups: rank 0's job endpoint, then (optionally) every other rank's endpoint."""
    first_host = hosts[0][0]
    groups = [{"targets": [_hostport(first_host, port)], "labels": {**labels, "optsel_endpoint": "job"}}]
    if per_rank_endpoints:
        others = [
            _hostport(host, port + local)
            for node, (host, slots) in enumerate(hosts)
            for local in range(slots)
            if (node, local) != (0, 0)
        ]
        if others:
            groups.append({"targets": others, "labels": {**labels, "optsel_endpoint": "rank"}})
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="file_sd JSON file to write (atomically)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="monitoring.port of the run")
    parser.add_argument("--per-rank-endpoints", action="store_true", help="monitoring.per_rank_endpoints is on")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--nodelist", help="SLURM nodelist (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--ranks-per-node", type=int, help="default: $SLURM_NTASKS_PER_NODE, $SLURM_GPUS_ON_NODE, 1")
    parser.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", ""), help="optsel_job target label")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra target label")
    args = parser.parse_args(argv)

    if args.hostfile:
        hosts = parse_hostfile(args.hostfile)
    else:
        nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            parser.error("no hosts: pass --hostfile or --nodelist, or run inside a SLURM job (SLURM_JOB_NODELIST)")
        per_node = args.ranks_per_node
        if not per_node:
            env_count = os.environ.get("SLURM_NTASKS_PER_NODE", "") or os.environ.get("SLURM_GPUS_ON_NODE", "") or "1"
            leading = re.match(r"\d+", env_count)  # SLURM writes e.g. "4(x2)"
            if leading is None:
                parser.error(f"cannot read ranks per node from {env_count!r}: pass --ranks-per-node")
            per_node = int(leading.group())
        hosts = [(host, per_node) for host in expand_nodelist(nodelist)]
    labels = {"optsel_job": args.job} if args.job else {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", key):
            parser.error(f"--label {item!r}: expected KEY=VALUE with a Prometheus label name as KEY")
        labels[key] = value
    groups = build_targets(hosts, args.port, args.per_rank_endpoints, labels)
    _atomic_write(Path(args.out), json.dumps(groups, indent=1) + "\n")
    print(f"wrote {sum(len(g['targets']) for g in groups)} target(s) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
