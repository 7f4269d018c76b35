"""selection/ stays typed and narrow: no parameter typed ``Any`` where an optsel object (the selector, a
batch, factors, a step context) is meant, no function with more than 8 parameters, and FTW's exchanges
reach the selector only through the typed step context (selection/ftw/context.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support.common import REPO

SELECTION = REPO / "selection"
#: the most parameters a function in selection/ may take (self and cls not counted)
MAX_PARAMS = 8
#: parameter names that always mean an optsel object: typing one of them ``Any`` hides the selector's shape
OPTSEL_ROLES = {"ftw", "selector", "pool", "target", "local", "factors", "geoms", "ctx", "context", "scores"}


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x is not None)]
    return [p for p in every if p.arg not in ("self", "cls")]


def _is_any(annotation: ast.expr | None) -> bool:
    text = ast.unparse(annotation) if annotation is not None else ""
    return text in ("Any", "typing.Any", "Any | None", "None | Any")


def problems(source: str, name: str) -> list[str]:
    """``file:line: why`` for each function of ``source`` that breaks the rules above."""
    out = []
    for fn in _functions(ast.parse(source)):
        params = _params(fn)
        if len(params) > MAX_PARAMS:
            out.append(f"{name}:{fn.lineno}: {fn.name} takes {len(params)} parameters (> {MAX_PARAMS})")
        for p in params:
            if p.arg in OPTSEL_ROLES and _is_any(p.annotation):
                out.append(f"{name}:{fn.lineno}: {fn.name}({p.arg}: Any)")
    return out


def _sources() -> list[Path]:
    return sorted(SELECTION.rglob("*.py"))


def test_the_checker_finds_what_it_looks_for():
    bad = "def f(ftw: Any, a, b, c, d, e, f, g, h): ...\nclass C:\n    def m(self, target: Any | None): ..."
    found = problems(bad, "x.py")
    assert len(found) == 3, found
    assert problems("def f(self, a, b, c, d, e, f, g, h): ...\ndef g(optimizer: Any): ...", "y.py") == []


def test_no_any_typed_selector_and_no_function_over_eight_parameters():
    assert _sources(), SELECTION
    found = [p for path in _sources() for p in problems(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "\n".join(found)


def test_no_any_typed_ftw_parameter_by_text():
    pattern = re.compile(r"\b(ftw|selector)\s*:\s*Any\b")
    found = [f"{path.relative_to(REPO)}" for path in _sources() if pattern.search(path.read_text())]
    assert found == [], found


def test_the_exchanges_touch_no_selector_private():
    """An exchange sees the step through StepContext: no ``ftw.``/``selector.`` attribute, no ``._private``
    of another object but its own (``self._...``)."""
    exchanges = sorted((SELECTION / "ftw" / "exchanges").glob("*.py"))
    assert {p.name for p in exchanges} >= {"base.py", "direction.py", "factors.py", "sketches.py"}
    found = []
    for path in exchanges:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("ftw", "selector") or (node.attr.startswith("_") and node.value.id != "self"):
                    if not node.attr.startswith("__"):
                        found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == [], found
