"""The strict config loader names the bad key's full path."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from optsel.config_loader import ConfigError, apply_overrides, from_mapping


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
