"""House rules a maintainer would otherwise check by eye, read from the source with ``ast`` and ``re``.

- no function of the package takes more than 8 parameters (``self``/``cls`` not counted): group them in a
  dataclass;
- no parameter or annotated attribute whose name is an optsel role (trainer, selector, engine, state, config,
  batch, ...) is typed ``Any``: where an optsel type is meant, it is named;
- comments and docstrings cite no issue numbers (a reader of the repository cannot see them) and refer to
  docs/design.md by anchor, not by section number.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from support.common import REPO

PACKAGE_FOLDERS = ("optsel", "pipeline", "selection", "launch", "monitoring")
MAX_PARAMETERS = 8
#: parameter / attribute names that stand for an optsel object (``Any`` there hides a real type)
ROLE = re.compile(
    r"^(trainer|ftw|selector|engine|state|cfg|config|view|model_view|manager|callbacks?|sinks?|batch|pool|target|"
    r"selection|factors|geoms?|geometry|exchange|ctx|context|result|optim|run_config)$"
)
ISSUE_REF = re.compile(r"(?i)\bissues? #?\d+\b")
SECTION_REF = re.compile(r"design\.md,?\s*§\d|(?<![\w#])§\d")


def _package_files() -> list[Path]:
    return [p for folder in PACKAGE_FOLDERS for p in sorted((REPO / folder).rglob("*.py"))]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = node.args
    return [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]


def too_many_parameters(files: list[Path], root: Path = REPO) -> list[str]:
    return [
        f"{p.relative_to(root)}:{f.lineno} {f.name} has {len(_parameters(f))} parameters"
        for p in files
        for f in _functions(p)
        if len(_parameters(f)) > MAX_PARAMETERS
    ]


def roles_typed_any(files: list[Path], root: Path = REPO) -> list[str]:
    out = []
    for p in files:
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for x in _parameters(node):
                    if (
                        x.annotation is not None
                        and ast.unparse(x.annotation).strip("'\"") == "Any"
                        and ROLE.match(x.arg)
                    ):
                        out.append(f"{p.relative_to(root)}:{node.lineno} {node.name}({x.arg}: Any)")
            elif isinstance(node, ast.AnnAssign) and ast.unparse(node.annotation).strip("'\"") == "Any":
                target = node.target
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if ROLE.match(name):
                    out.append(f"{p.relative_to(root)}:{node.lineno} {name}: Any")
    return out


def test_no_function_takes_more_than_eight_parameters():
    found = too_many_parameters(_package_files())
    assert not found, "\n".join(found)


def test_no_optsel_role_is_typed_any():
    found = roles_typed_any(_package_files())
    assert not found, "\n".join(found)


def test_the_checks_can_fail(tmp_path):
    """Each check finds a planted violation (so an empty result means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import Any\n"
        "def f(a, b, c, d, e, f, g, h, i):\n    pass\n"
        "def g(trainer: Any, n: int):\n    pass\n"
        "class C:\n    engine: Any\n"
    )
    assert too_many_parameters([bad], root=tmp_path) == ["bad.py:2 f has 9 parameters"]
    assert roles_typed_any([bad], root=tmp_path) == ["bad.py:4 g(trainer: Any)", "bad.py:7 engine: Any"]
    assert ISSUE_REF.search("# see issue 12") and not ISSUE_REF.search("# the issues above")
    assert SECTION_REF.search("docs/design.md §8") and not SECTION_REF.search("docs/design.md#single-pass")


@pytest.mark.parametrize("pattern", [ISSUE_REF, SECTION_REF], ids=["issue numbers", "design section numbers"])
def test_no_issue_numbers_or_section_numbers_in_code_and_docs(pattern):
    """Code, tests, scripts, configs and the living docs. Dated benchmark records (results/, the grid file's
    settings history) keep what they said when they were written."""
    files = [
        p
        for folder in (*PACKAGE_FOLDERS, "tests", "scripts", "configs", "benchmarks", "docs")
        for p in sorted((REPO / folder).rglob("*"))
        if p.suffix in {".py", ".md", ".yaml", ".sh"} and p.name != "quality_grid.yaml" and p.is_file()
    ]
    files.append(REPO / "README.md")
    found = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}"
        for p in files
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
