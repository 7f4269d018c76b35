"""The one registry (optsel/registry.py): unique names with both places named, unknown names answered
with the known ones, built-ins imported on the first lookup, entry points loaded from installed
distributions (a broken one named with its distribution), and a plug-in never taking a built-in's name.

Entry points come from a real ``*.dist-info`` folder written into tmp_path and put on ``sys.path``:
``importlib.metadata`` reads it like any installed distribution."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from optsel.registry import DuplicateNameError, PluginLoadError, Registry, UnknownNameError
from optsel.selection.base import SELECTORS, get_selector_factory, selector_names
from optsel.selection.model_view import MODEL_VIEWS, ModelView, model_view_for, register_model_view, view_name


def first() -> str:
    return "first"


def second() -> str:
    return "second"


def _install(site: Path, dist: str, group: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Write distribution ``dist`` (its modules and an entry_points.txt for ``group``) into ``site``."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder on sys.path; the modules the test writes there are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(tmp_path) in sys.modules[name].__file__:
            del sys.modules[name]


@pytest.fixture
def target():
    """``publish(registry)``: make ``registry`` importable as module ``optsel_test_target`` (attribute
    THINGS), for the modules a test writes to register into, as a plug-in's module would."""
    holder = type(sys)("optsel_test_target")
    sys.modules["optsel_test_target"] = holder

    def publish(registry: Registry) -> Registry:
        holder.THINGS = registry
        return registry

    yield publish
    del sys.modules["optsel_test_target"]


def test_a_taken_name_is_refused_with_both_places_named():
    things: Registry = Registry("thing")
    things.add("a", first)
    assert things.add("a", first) is first  # the same object again is one registration
    with pytest.raises(
        DuplicateNameError,
        match=r"thing 'a' registered twice: by .*test_registry\.first and by "
        r".*test_registry\.second",
    ):
        things.add("a", second)
    assert things.get("a") is first


def test_an_unknown_name_lists_the_known_ones():
    things: Registry = Registry("thing")
    things.register("b")(second)
    things.register("a")(first)
    with pytest.raises(UnknownNameError) as err:
        things.get("c")
    assert str(err.value) == "unknown thing 'c'; known: a, b"
    assert isinstance(err.value, KeyError) and things.names() == ["a", "b"] and "a" in things


def test_builtin_modules_are_imported_on_the_first_lookup(site, target):
    (site / "optsel_test_builtins.py").write_text(
        "import optsel_test_target\noptsel_test_target.THINGS.add('built', len)\n"
    )
    things = target(Registry("thing", builtin_modules=("optsel_test_builtins",)))
    assert "optsel_test_builtins" not in sys.modules
    assert things.get("built") is len
    assert "optsel_test_builtins" in sys.modules


def test_entry_points_are_loaded_by_name_and_a_module_may_register_itself(site, target):
    group = "optsel_test.good"
    _install(
        site,
        "good-plugin",
        group,
        {"shout": "good_plugin:shout", "whisper": "good_plugin_self"},
        {
            "good_plugin": "def shout():\n    return 'SHOUT'\n",
            "good_plugin_self": "import optsel_test_target\noptsel_test_target.THINGS.add('whisper', str.lower)\n",
        },
    )
    things = target(Registry("thing", group=group))
    assert things.get("shout")() == "SHOUT" and things.get("whisper") is str.lower
    things.add("inhouse", first)  # registered after the plug-ins, listed before them
    assert things.names() == ["inhouse", "shout", "whisper"]
    assert [name for name, _ in things.items()] == ["inhouse", "shout", "whisper"]


def test_what_a_plugin_import_registers_from_the_home_package_stays_built_in(site, target):
    group = "optsel_test.home"
    _install(
        site,
        "late-plugin",
        group,
        {"plug": "late_plugin"},
        {
            "late_plugin": "import optsel_test_target\noptsel_test_target.THINGS.add('plug', str.upper)\n"
            "import optsel_test_home\n",
            "optsel_test_home": "import optsel_test_target\n\ndef home():\n    return 'home'\n\n"
            "optsel_test_target.THINGS.add('home', home)\n",
        },
    )
    things = target(Registry("thing", group=group, home="optsel_test_home"))
    assert [name for name, _ in things.items()] == ["home", "plug"]  # registered second, asked first


def test_a_broken_entry_point_names_itself_and_its_distribution_every_time(site):
    group = "optsel_test.broken"
    _install(site, "broken-plugin", group, {"bad": "broken_plugin:thing"}, {"broken_plugin": "import no_such_module\n"})
    things: Registry = Registry("thing", group=group)
    for _ in range(2):  # not answered from a half-loaded registry on the second lookup
        with pytest.raises(PluginLoadError) as err:
            things.names()
        message = str(err.value)
        assert "entry point 'bad = broken_plugin:thing'" in message
        assert "distribution broken-plugin 1.0" in message
        assert "ModuleNotFoundError" in message and "no_such_module" in message


def test_a_module_entry_point_that_registers_nothing_is_refused(site):
    group = "optsel_test.empty"
    _install(site, "empty-plugin", group, {"nothing": "empty_plugin"}, {"empty_plugin": "X = 1\n"})
    with pytest.raises(PluginLoadError, match=r"names module empty_plugin, which registered no thing 'nothing'"):
        Registry("thing", group=group).names()


def test_a_plugin_may_not_take_a_builtin_name(site):
    group = "optsel_test.impostor"
    _install(site, "impostor-plugin", group, {"a": "impostor_plugin:impostor"}, {"impostor_plugin": "impostor = max\n"})
    things: Registry = Registry("thing", group=group)
    things.add("a", first)
    with pytest.raises(DuplicateNameError) as err:
        things.names()
    message = str(err.value)
    assert "thing 'a' is built in (" in message and "test_registry.first" in message
    assert "entry point 'a = impostor_plugin:impostor'" in message and "impostor-plugin 1.0" in message


def test_the_three_registries_keep_their_builtins():
    assert {"random", "full", "ftw", "greats", "less", "uds"} <= set(selector_names())
    assert get_selector_factory("random") is SELECTORS.get("random")
    with pytest.raises(KeyError, match=r"unknown selector 'nosuch'; known: .*random"):
        get_selector_factory("nosuch")
    with pytest.raises(ValueError, match=r"selector 'random' registered twice"):
        SELECTORS.add("random", first)

    from optsel.pipeline.engines.shared import ENGINES, register_engine

    assert ENGINES.names() == ["deepspeed", "fsdp2"]
    with pytest.raises(ValueError, match=r"engine 'fsdp2' registered twice"):
        register_engine("fsdp2")(first)
    assert [name.rsplit(".", 1)[1] for name, _ in MODEL_VIEWS.items()][:2] == ["detect_fsdp2", "detect_zero3"]


def test_the_first_detector_that_recognises_the_model_wins():
    class Marked(ModelView):
        name = "marked"

    class Everything(ModelView):
        name = "everything"

    def detect_marked(model, optimizer):
        return Marked(model, optimizer) if getattr(model, "marked", False) else None

    def detect_everything(model, optimizer):
        return Everything(model, optimizer)

    register_model_view(detect_marked)
    register_model_view(detect_everything)
    try:
        model = torch.nn.Linear(2, 2)
        assert type(model_view_for(model, None)) is Everything
        model.marked = True  # both recognise it now: the one registered first wins
        assert type(model_view_for(model, None)) is Marked
    finally:
        MODEL_VIEWS.remove(view_name(detect_marked))
        MODEL_VIEWS.remove(view_name(detect_everything))
    assert view_name(detect_marked) not in MODEL_VIEWS
    assert type(model_view_for(torch.nn.Linear(2, 2), None)) is ModelView
