"""The strict config loader names the bad key's full path."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from optsel.config_loader import ConfigError, apply_overrides, from_mapping

from support.common import REPO


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    steps: int


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=lambda: Inner(steps=1))


def test_valid_and_overrides():
    cfg = from_mapping(Outer, apply_overrides({"inner": {"steps": 3}}, ["inner.lr=2e-4", "inner.mode=b"]))
    assert cfg.inner.lr == pytest.approx(2e-4) and cfg.inner.mode == "b" and cfg.inner.steps == 3


@pytest.mark.parametrize(
    "data, path, words",
    [
        ({"inner": {"steps": 1, "lrr": 1}}, "inner.lrr", "unknown key"),
        ({"inner": {"steps": "many"}}, "inner.steps", "integer"),
        ({"inner": {"steps": 1, "mode": "c"}}, "inner.mode", "one of"),
        ({"inner": {}}, "inner.steps", "required"),
        ({"inner": 5}, "inner", "mapping"),
    ],
)
def test_errors_name_the_key(data, path, words):
    with pytest.raises(ConfigError) as info:
        from_mapping(Outer, data)
    assert info.value.path == path and words in str(info.value)


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("selection.options.ftw.gram=dense", "selection.options.ftw.gram", ("exact", "ghost", "sketch", "auto")),
        ("selection.options.ftw.exchange=all", "selection.options.ftw.exchange", ("direction", "factors", "sketches")),
    ],
)
def test_a_bad_ftw_value_names_the_key_and_the_allowed_values(tmp_path, override, key, allowed):
    """Through the loader ``optsel train`` uses: the allowed values are read from FTWConfig's Literal."""
    from optsel.pipeline.train.run_config import load_run_config

    from support.common import REPO

    with pytest.raises(ConfigError) as info:
        load_run_config(REPO / "configs" / "demo.yaml", [f"output_dir={tmp_path / 'runs'}", override])
    assert info.value.path == key
    message = str(info.value)
    assert all(repr(value) in message for value in allowed), message
    assert repr(override.rsplit("=", 1)[1]) in message


def test_check_literal_fields_reads_the_allowed_values_from_the_type():
    from optsel.config_loader import check_literal_fields, literal_values

    assert literal_values(Literal["a", "b"] | None) == ("a", "b", None) and literal_values(int) == ()
    inner = Inner(steps=1)
    check_literal_fields(inner)
    inner.mode = "c"
    with pytest.raises(ValueError, match=r"^mode: must be one of \('a', 'b'\), got 'c'$"):
        check_literal_fields(inner)


def test_engine_name_is_checked_against_the_engine_registry_plugins_included():
    """engine.name is any registered engine (built in or an optsel.engines plug-in); an unknown one is an
    error naming the key and the known engines."""
    from optsel.pipeline.engines.shared import ENGINES
    from optsel.pipeline.train.run_config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match=r"engine.name.*unknown engine 'tpu'; known: .*deepspeed.*fsdp2"):
        load_run_config(REPO / "configs/demo.yaml", ["engine.name=tpu"])
    ENGINES.add("tpu", lambda **kwargs: None)
    try:
        assert load_run_config(REPO / "configs/demo.yaml", ["engine.name=tpu"]).engine.name == "tpu"
    finally:
        ENGINES.remove("tpu")
