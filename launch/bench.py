"""``optsel bench {quality,speed,overhead,select_grid,distributed_select,soak,sketch_alignment} [args]``: run a benchmark script of the
source checkout (benchmarks/, next to this package's folders; see benchmarks/README.md)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = ("quality", "speed", "overhead", "select_grid", "distributed_select", "soak", "sketch_alignment")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print(
            f"usage: optsel bench {{{','.join(BENCHMARKS)}}} [--quick] [options]   (see benchmarks/README.md)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / f"{argv[0]}.py").is_file():
        print(
            f"optsel bench: the benchmarks live in the source checkout (benchmarks/{argv[0]}.py), not found under "
            f"{root}; install optsel editable from a checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    module.main(argv[1:])
    return 0
