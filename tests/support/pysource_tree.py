"""A small Python source tree for the pysource tests: a target package ``tpkg``, another package ``other``,
a licence, and the files the walk must skip (a symlink out of the root, an undecodable file, a syntax
error, a test suite, a private function)."""

from __future__ import annotations

from pathlib import Path

LICENSE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and the "
    "associated documentation files, to deal in the software without restriction, including the rights "
    "to use, copy and modify it, subject to the conditions that follow in this notice."
)
SECRET = "This function lives outside the root and is reached only through a symlink that must not be followed."


def word(i: int) -> str:
    """A letters-only word unique to ``i`` (normalised dedup ignores digits)."""
    return "w" + "".join(chr(ord("a") + int(d)) for d in str(i))


def doc(i: int, topic: str) -> str:
    """An English docstring unique to ``i``, of a length that grows with ``i % 5``."""
    extra = " It is used when the list of values is empty and the caller asks for a default." * (i % 5)
    return f"Return the {word(i)} {topic} of the given object and check that it is valid for this call.{extra}"


def _module(topic: str, first: int, count: int, with_class: bool) -> str:
    lines = [f'"""The {topic} module: helpers that are used by the {topic} package and its tests."""', ""]
    for i in range(first, first + count):
        lines += [f"def {topic}_{word(i)}(value, limit: int = 3) -> str:", f'    """{doc(i, topic)}"""', "", ""]
    if with_class:
        lines += [
            "class Klass:",
            "    def method(self, x: int = 1) -> str:",
            f'        """{doc(first + count, topic)} This is a method of the class."""',
            "",
        ]
    lines += [
        "def _hidden(a):",
        '    """A private function that is skipped because its name starts with an underscore."""',
    ]
    return "\n".join(lines) + "\n"


def write_tree(root: Path, n_target: int = 30, n_other: int = 80) -> Path:
    """Write the tree under ``root`` (and a file outside it that a symlink points to); returns ``root``."""
    (root / "tpkg").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "tests").mkdir()
    (root / "tpkg" / "__init__.py").write_text('"""The target package."""\n')
    (root / "tpkg" / "core.py").write_text(_module("target", 0, n_target, with_class=True))
    (root / "other" / "__init__.py").write_text("")
    (root / "other" / "util.py").write_text(_module("other", 1000, n_other, with_class=False))
    (root / "tests" / "test_core.py").write_text(f'def test_core():\n    """{doc(5000, "test")}"""\n')
    (root / "LICENSE").write_text(LICENSE + "\n")
    (root / "broken.py").write_text('def broken(:\n    """Never parsed."""\n')
    (root / "latin.py").write_bytes(b'"""caf\xe9 is not UTF-8."""\n')
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "secret.py").write_text(f'def secret():\n    """{SECRET}"""\n')
    (root / "escape.py").symlink_to(outside / "secret.py")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return root
