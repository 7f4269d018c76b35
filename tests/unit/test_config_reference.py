"""The config reference (pipeline/config_reference.py → docs/configuration.md): current, complete, and
its defaults are the dataclasses' own."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_type_hints

import pytest
import yaml

from optsel.pipeline import config_reference as ref

from support.common import REPO

DOC = REPO / "docs" / "configuration.md"
ROW = re.compile(
    r"^\| `(?P<key>[^`]+)` \| (?P<type>[^|]*) \| `(?P<default>(?:[^`\\]|\\.)*)` \| (?P<allowed>[^|]*) \| "
    r"(?P<meaning>.*) \|$"
)


@pytest.fixture(scope="module")
def markdown() -> str:
    return ref.reference_markdown()


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, str]]:
    """{key: the row's cells} from docs/configuration.md, both configs (the prepare keys prefixed)."""
    text = DOC.read_text()
    run, _, prepare = text.partition("## Prepare config")
    out = {}
    for prefix, part in (("run:", run), ("prepare:", prepare)):
        for line in part.splitlines():
            match = ROW.match(line)
            if match:
                out[prefix + match["key"]] = {k: v.replace("\\|", "|") for k, v in match.groupdict().items()}
    return out


def test_docs_configuration_md_is_current(markdown):
    assert DOC.read_text() == markdown, (
        f"docs/configuration.md is out of date with the config dataclasses; regenerate it with `{ref.REGENERATE}`"
    )


def test_every_key_has_a_meaning():
    missing = [d.key for d in ref.run_keys() + ref.prepare_keys() if not d.meaning.strip()]
    assert not missing, (
        f"config fields without a meaning: {missing}; add a `#: meaning` comment at the end of the "
        f"field's line or on the line above it (pipeline/config_reference.py)"
    )


def test_the_asked_for_keys_are_listed(rows):
    for key in (
        "run:model.source",
        "run:model.path",
        "run:model.lora",
        "run:model.lora.r",
        "run:model.lora.target_modules",
        "run:selection.options.ftw.gram",
        "run:selection.options.greats.lr",
        "run:monitoring.port",
        "run:checkpoint.resume",
        "run:engine.name",
        "prepare:tokenizer.kind",
        "prepare:tokenizer.path",
        "prepare:template.prompt",
        "prepare:hf.path",
    ):
        assert key in rows, key
    assert rows["run:model.source"]["allowed"] == "`config`, `local`"
    assert rows["prepare:tokenizer.kind"]["allowed"] == "`byte`, `bpe`, `pretrained`"
    assert rows["run:model.path"]["type"] == "path"
    assert "selection.options.ftw.budget" not in {k.removeprefix("run:") for k in rows}  # set as selection.budget
    assert "[docs/data.md](data.md)" in DOC.read_text()


def _field(root: type, key: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field a dotted key names, walked here independently of the generator."""
    from optsel.selection.base import get_selector_factory

    cls, parts = root, key.split(".")
    for i, part in enumerate(parts):
        if i and parts[i - 1] == "options" and cls.__name__ == "SelectionConfig":
            cls = get_selector_factory(part).config_class
            continue
        f = {f.name: f for f in dataclasses.fields(cls)}[part]
        if i == len(parts) - 1:
            return cls, f
        hint = get_type_hints(cls)[part]
        if part == "options":
            continue
        cls = next(a for a in (hint, *getattr(hint, "__args__", ())) if dataclasses.is_dataclass(a))
    raise AssertionError(key)


def test_each_listed_default_is_the_dataclass_default(rows):
    from optsel import resources
    from optsel.config_loader import from_mapping, to_plain
    from optsel.pipeline.data.prepare import PrepareConfig
    from optsel.pipeline.train.run_config import RunConfig

    checked = 0
    for name, row in rows.items():
        which, key = name.split(":", 1)
        if re.fullmatch(r"selection\.options\.\w+", key):
            assert row["default"] == "{}"
            continue
        cls, f = _field(RunConfig if which == "run" else PrepareConfig, key)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert row["default"] == "required", key
            continue
        actual = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = row["default"]
        if shown.startswith("<bundled>/"):
            assert Path(actual).resolve() == resources.builtin_path(shown.removeprefix("<bundled>/")).resolve(), key
        elif dataclasses.is_dataclass(actual):  # a block: {} builds it with every key at its default
            assert shown == "{}" and from_mapping(type(actual), {}) == actual, key
        else:
            assert yaml.safe_load(shown) == to_plain(actual), f"{key}: listed {shown!r}, dataclass {actual!r}"
        checked += 1
    assert checked > 150


@dataclass(kw_only=True)
class _Example:
    #: the meaning above
    #: continued
    a: int = 1
    b: Literal["x", "y"] = "x"  #: the meaning at the end
    c: list[str] = field(default_factory=list)  # a plain note, not a meaning
    d: str | None = None  #: the first line of a long field
    # a plain comment between fields
    e: float = 2.0


@dataclass(kw_only=True)
class _Derived(_Example):
    b: Literal["x", "y"] = "y"
    e: float = 3.0  #: redeclared with its own meaning


def test_the_meaning_convention():
    assert ref.field_meanings(_Example) == {
        "a": "the meaning above continued",
        "b": "the meaning at the end",
        "d": "the first line of a long field",
    }
    derived = ref.field_meanings(_Derived)
    assert derived["b"] == "the meaning at the end" and derived["e"] == "redeclared with its own meaning"
    docs = {d.key: d for d in ref.keys(_Derived, "x.")}
    assert (docs["x.b"].type, docs["x.b"].default, docs["x.b"].allowed) == ("str", "y", "x, y")
    assert (docs["x.d"].type, docs["x.d"].default, docs["x.d"].allowed) == ("str or null", "null", "")
    assert docs["x.c"].meaning == "" and docs["x.c"].default == "[]"


def test_cli_prints_the_keys(capsys):
    from optsel.launch.cli import main

    assert main(["configs", "keys", "prepare"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^tokenizer\.kind +str += byte +\[byte, bpe, pretrained\] +# ", out, re.M)
    assert "model.lora" not in out
    assert main(["configs", "keys", "run", "--markdown"]) == 0
    assert "| `model.lora.r` | int | `8` |" in capsys.readouterr().out
