"""The package-level import graph of optsel, read from the source with ``ast`` (nothing is imported).

    .venv/bin/python scripts/import_graph.py             # edges with counts, cycles, rule violations
    .venv/bin/python scripts/import_graph.py --check     # the same; exit 1 if the layering rule is broken
    .venv/bin/python scripts/import_graph.py --png docs/architecture.png   # draw the package graph

Packages: ``optsel`` (the core, optsel/*.py), ``launch``, ``pipeline``, ``pipeline.engines``,
``selection``, ``selection.baselines``, ``monitoring`` and ``benchmarks`` (the repository's top-level
folders, see pyproject's package-dir). Every ``import`` / ``from ... import`` counts, the ones inside a
function too (marked "in function": they run later, but they are dependencies all the same).

The rule (``--check``): imports run one way down the layers

    benchmarks → launch → pipeline (+ pipeline.engines) → selection (+ selection.baselines) → optsel core

and a layer may import any layer below it, never one above. ``monitoring`` sits beside selection:
pipeline, launch and benchmarks may import it, and it imports only the optsel core. The optsel core
(``optsel/*.py``: distributed, resources, config) imports no subpackage. Within a layer (pipeline ↔
pipeline.engines, selection ↔ selection.baselines) imports are allowed; cycles there are listed but not
an error. ``--allow SRC:DST`` tolerates one known-broken package edge (it is still printed).

It also lists module-level import cycles and, for the rule "selection/ names no engine", the places
in selection/ that name an engine in code (identifiers, attributes and string constants; comments and
docstrings do not count). Neither fails ``--check``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PYPROJECT = ROOT / "pyproject.toml"


def _package_metadata(pyproject: Path = PYPROJECT) -> tuple[dict[str, str], dict[str, str]]:
    """(folder → dotted package, dotted package → short graph name), read from pyproject's
    ``[tool.setuptools]`` ``packages`` and ``package-dir``: the one place the mapping is written.
    A graph node is a package at most two levels below ``optsel`` that holds Python modules
    (``optsel.pipeline.train.callbacks`` belongs to ``pipeline.train``); ``benchmarks`` is added (a
    repository folder, not installed)."""
    import tomllib

    tool = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = tool["package-dir"]
    folders = {folder: dotted for dotted, folder in package_dir.items()}
    folders["benchmarks"] = "benchmarks"
    packages: dict[str, str] = {"benchmarks": "benchmarks"}
    for dotted in tool["packages"]:
        root_pkg = max((d for d in package_dir if dotted == d or dotted.startswith(d + ".")), key=len)
        folder = ROOT / package_dir[root_pkg] / Path(*dotted[len(root_pkg) :].split(".")[1:])
        if dotted.count(".") > 2 or not any(folder.glob("*.py")):
            continue
        packages[dotted] = "optsel" if dotted == "optsel" else dotted.removeprefix("optsel.")
    return folders, packages


#: repository folder → dotted package it installs as; dotted package → short name in the graph
FOLDERS, PACKAGES = _package_metadata()
#: layer → the layers it may import (besides itself)
ALLOWED = {
    "benchmarks": {"launch", "pipeline", "selection", "monitoring", "optsel"},
    "launch": {"pipeline", "selection", "monitoring", "optsel"},
    "integrations": {"pipeline", "selection", "monitoring", "optsel"},  # optsel inside other trainers (HF)
    "pipeline": {"selection", "monitoring", "optsel"},
    "monitoring": {"optsel"},
    "selection": {"optsel"},
    "optsel": set(),
}
#: inside a layer, its rooms from the bottom up: a room may import the rooms before it, never one after
ROOMS = {
    "pipeline": [
        "pipeline.files",
        "pipeline.checkpoint",
        "pipeline.engines",
        "pipeline.data",
        "pipeline.train",
        "pipeline",
    ],
    "selection": ["selection", "selection.ftw", "selection.baselines"],
}
ENGINE_NAME = re.compile(r"(?i)deepspeed|fsdp|zero-?3|dtensor|fully_shard|^ds_(?!target)\w+")


@dataclass(frozen=True)
class Import:
    src: str  # importing module (dotted)
    dst: str  # imported module (dotted, the deepest optsel/benchmarks module it names)
    file: str  # repository-relative path
    line: int
    in_function: bool
    text: str


def layer(package: str) -> str:
    return package.split(".")[0]


def package_of(module: str) -> str | None:
    best = None
    for dotted, short in PACKAGES.items():
        if module == dotted or module.startswith(dotted + "."):
            if best is None or len(dotted) > len(best[0]):
                best = (dotted, short)
    return best[1] if best else None


def source_files(root: Path = ROOT) -> dict[str, Path]:
    """dotted module name → file, for every .py file of the package folders."""
    out = {}
    for folder, dotted in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([dotted, *parts])] = path
    return out


def _resolve(name: str, known: set[str]) -> str:
    """The deepest known module that ``name`` (a dotted import target) names."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name


def imports_of(module: str, path: Path, known: set[str], root: Path = ROOT) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = path.read_text().splitlines()
    is_package = path.name == "__init__.py"
    out: list[Import] = []

    def add(target: str, node: ast.stmt, in_function: bool) -> None:
        if package_of(target) is None:
            return  # stdlib / third party
        edge = Import(
            module,
            _resolve(target, known),
            str(path.relative_to(root)),
            node.lineno,
            in_function,
            lines[node.lineno - 1].strip(),
        )
        if edge not in out:  # one statement naming several names of one module counts once
            out.append(edge)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(full if full in known else base, child, in_function)
            visit(child, inner)

    visit(tree, False)
    return out


def collect(root: Path = ROOT) -> list[Import]:
    files = source_files(root)
    known = set(files)
    edges: list[Import] = []
    for module, path in files.items():
        edges.extend(imports_of(module, path, known, root))
    return edges


def package_edges(edges: list[Import]) -> dict[tuple[str, str], list[Import]]:
    out: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for e in edges:
        src, dst = package_of(e.src), package_of(e.dst)
        if src != dst:
            out[(src, dst)].append(e)
    return dict(sorted(out.items()))


def breaks_rule(src: str, dst: str) -> bool:
    """Whether the package edge src → dst goes up: to a layer src may not import, or, within a
    layer, to a room above src's (ROOMS)."""
    if layer(src) != layer(dst):
        return layer(dst) not in ALLOWED.get(layer(src), set())
    rooms = ROOMS.get(layer(src), [])
    return src in rooms and dst in rooms and rooms.index(dst) > rooms.index(src)


def violations(pkg_edges: dict[tuple[str, str], list[Import]]) -> dict[tuple[str, str], list[Import]]:
    return {(s, d): v for (s, d), v in pkg_edges.items() if breaks_rule(s, d)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def engine_names(root: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, name) for each place selection/ names an engine in code (not in docstrings/comments)."""
    out = []
    for path in sorted((root / "selection").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.alias):
                names = [node.name]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                names = re.findall(r"[\w\-]+", node.value)
            for name in names:
                if ENGINE_NAME.search(name):
                    out.append((str(path.relative_to(root)), getattr(node, "lineno", 0), name))
    return sorted(set(out))


def report(edges: list[Import], allow: set[tuple[str, str]], out=sys.stdout, root: Path = ROOT) -> int:
    """Print the graph; return the number of package edges that break the rule and are not allowed."""
    pkg = package_edges(edges)
    print("package import edges (importer -> imported: import statements, of which inside a function):", file=out)
    for (s, d), items in pkg.items():
        lazy = sum(e.in_function for e in items)
        print(f"  {s:<20} -> {d:<20} {len(items):3d}" + (f"  ({lazy} in function)" if lazy else ""), file=out)

    graph: dict[str, set[str]] = defaultdict(set)
    for s, d in pkg:
        graph[s].add(d)
    print("\npackage cycles:", file=out)
    pkg_cycles = cycles(graph)
    for comp in pkg_cycles:
        kind = "within one layer" if len({layer(p) for p in comp}) == 1 else "ACROSS LAYERS"
        print(f"  {' <-> '.join(comp)}  ({kind})", file=out)
    if not pkg_cycles:
        print("  none", file=out)

    mod_graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if e.src != e.dst:
            mod_graph[e.src].add(e.dst)
    print("\nmodule cycles (any import, in-function ones included):", file=out)
    mod_cycles = [
        c for c in cycles(mod_graph) if not any(m in PACKAGES for m in c)
    ]  # a package __init__ importing its own modules is not one
    for comp in mod_cycles:
        print("  " + " <-> ".join(comp), file=out)
    if not mod_cycles:
        print("  none", file=out)

    print(
        "\nrule: benchmarks -> launch -> pipeline -> selection -> optsel core, downward only;"
        "\n      inside pipeline: (export, config reference) -> train -> data -> engines -> checkpoint -> files;"
        "\n      inside selection: baselines -> ftw -> selection (the shared pieces);"
        "\n      monitoring is imported by pipeline/launch/benchmarks and imports only the optsel core;"
        "\n      the optsel core imports no subpackage",
        file=out,
    )
    bad = violations(pkg)
    broken = 0
    if not bad:
        print("violations: none", file=out)
    for (s, d), items in bad.items():
        tolerated = (s, d) in allow
        broken += not tolerated
        print(f"violation: {s} -> {d}" + ("  (allowed by --allow: known, to be fixed)" if tolerated else ""), file=out)
        for e in items:
            print(f"    {e.file}:{e.line}: {e.text}" + ("  [in function]" if e.in_function else ""), file=out)

    names = engine_names(root)
    print(
        f"\nengine names in selection/ code (the rule: selection names no engine; informational): {len(names)}",
        file=out,
    )
    per_file: dict[str, list[str]] = defaultdict(list)
    for file, line, name in names:
        per_file[file].append(f"{line}:{name}")
    for file, where in per_file.items():
        print(f"  {file}: {len(where)}  ({', '.join(where[:6])}{', ...' if len(where) > 6 else ''})", file=out)
    return broken


# ---- picture -------------------------------------------------------------------------------------
POSITIONS = {
    "benchmarks": (-0.4, 5.4),
    "launch": (1.6, 5.4),
    "integrations": (3.8, 5.4),
    "pipeline": (-0.2, 4.5),
    "pipeline.train": (1.1, 4.1),
    "pipeline.data": (2.4, 3.7),
    "pipeline.engines": (3.7, 3.3),
    "pipeline.checkpoint": (5.0, 2.9),
    "pipeline.files": (6.0, 2.4),
    "selection.baselines": (0.0, 2.0),
    "selection.ftw": (2.2, 1.55),
    "selection": (0.9, 1.0),
    "monitoring": (4.6, 1.5),
    "optsel": (2.6, 0.2),
}


def draw(edges: list[Import], path: Path) -> None:
    """The package graph as a PNG: layers top to bottom, arrow = importer → imported, labelled with the
    number of import statements (f: inside a function); red arrows break the rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    pkg = package_edges(edges)
    bad = violations(pkg)
    fig, ax = plt.subplots(figsize=(12, 8))
    ax.set_xlim(-1.3, 6.9)
    ax.set_ylim(-0.4, 5.7)
    ax.axis("off")
    for name, (x, y) in POSITIONS.items():
        label = "optsel core\n(distributed, config_loader, resources)" if name == "optsel" else name
        outside = name == "benchmarks"
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=10,
            zorder=3,
            style="italic" if outside else "normal",
            bbox=dict(boxstyle="round,pad=0.45", fc="#f4f4f4" if outside else "#e8f0fb", ec="#335", lw=1),
        )
    for (s, d), items in pkg.items():
        if s not in POSITIONS or d not in POSITIONS:
            continue
        (x0, y0), (x1, y1) = POSITIONS[s], POSITIONS[d]
        wrong = (s, d) in bad
        faint = s == "benchmarks" or d == "optsel"  # outside the package, or the core everyone may use
        color = "#c0392b" if wrong else ("#9aa3ad" if faint else "#2c3e50")
        rad = 0.25 if y0 == y1 else 0.06
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0),
                (x1, y1),
                arrowstyle="-|>",
                mutation_scale=14,
                shrinkA=22,
                shrinkB=22,
                connectionstyle=f"arc3,rad={rad}",
                lw=1.0 + 0.25 * len(items) ** 0.5,
                color=color,
                linestyle="--" if s == "benchmarks" else "-",
                zorder=2,
            )
        )
        # the label sits on the curve's midpoint (arc3: control point = midpoint + rad * the chord turned left)
        dx, dy = x1 - x0, y1 - y0
        lx, ly = (x0 + x1) / 2 + rad / 2 * dy, (y0 + y1) / 2 - rad / 2 * dx
        lazy = sum(e.in_function for e in items)
        ax.text(
            lx,
            ly,
            f"{len(items)}" + (f" ({lazy}f)" if lazy else ""),
            fontsize=8,
            color=color,
            ha="center",
            va="center",
            zorder=4,
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85),
        )
    ax.set_title(
        "optsel package imports, read from the source by scripts/import_graph.py\n"
        "arrow = importer → imported; label = import statements (f: inside a function); "
        "red = against the layering rule",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a package edge breaks the layering rule")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="SRC:DST",
        help="tolerate this known-broken package edge under --check (repeatable)",
    )
    parser.add_argument("--png", type=Path, help="also draw the package graph into this PNG")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to read (default: this one)")
    args = parser.parse_args(argv)
    allow = {tuple(a.split(":", 1)) for a in args.allow}
    edges = collect(args.root)
    broken = report(edges, allow, root=args.root)
    if args.png:
        draw(edges, args.png)
        print(f"\nwrote {args.png}")
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())
