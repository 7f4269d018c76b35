"""Registries by name, filled by optsel's own modules and by third-party plug-ins.

A :class:`Registry` maps names to objects (selector factories, engine factories, model-view
detectors). It fills itself on the first lookup (:meth:`Registry.get`, :meth:`Registry.names`,
:meth:`Registry.items`): first it imports its built-in modules, whose decorators call
:meth:`Registry.add`; then it loads the entry points of its group (``importlib.metadata``), so that
an installed distribution extends optsel without any change here. A plug-in's entry point names an
object, registered under the entry point's name, or a module that registers its objects on import.

Names are unique: a second object under a taken name is refused with both places named, and a
plug-in may never take a built-in's name.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Generic, TypeVar

T = TypeVar("T")


class DuplicateNameError(ValueError):
    """A name registered twice (the message names both places)."""


class UnknownNameError(KeyError):
    """A lookup of a name nobody registered (the message lists the known names)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class PluginLoadError(ImportError):
    """An entry point that failed to load (the message names it and its distribution)."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object: ``origin`` says where it came from, ``plugin`` whether an entry point."""

    obj: T
    origin: str
    plugin: bool


def describe_object(obj: object) -> str:
    """``module.qualname`` of a class or function (its ``repr`` for anything else)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(obj)


def describe_entry_point(ep: metadata.EntryPoint) -> str:
    """``entry point 'name = module:attr' (group ..., distribution NAME VERSION)``."""
    dist = getattr(ep, "dist", None)
    where = f"distribution {dist.name} {dist.version}" if dist is not None else "no known distribution"
    return f"entry point '{ep.name} = {ep.value}' (group {ep.group}, {where})"


class Registry(Generic[T]):
    """Objects of one kind by name, loaded lazily from ``builtin_modules`` and entry-point ``group``.

    kind: what the objects are, in messages ("selector", "engine", "model view").
    builtin_modules: modules imported on the first lookup (their import registers the built-ins).
    group: the entry-point group of plug-ins (None: built-ins only).
    home: the package whose objects are built in, even when a plug-in's import is what registers them
        (a model-view plug-in that imports optsel.pipeline.engines registers the engines' own views).
    """

    def __init__(self, kind: str, builtin_modules: Sequence[str] = (), group: str | None = None, home: str = "optsel"):
        self.kind = kind
        self.builtin_modules = tuple(builtin_modules)
        self.group = group
        self.home = home
        self._entries: dict[str, Entry[T]] = {}
        self._lock = threading.RLock()
        self._builtins_loaded = False
        self._loaded_entry_points: set[tuple[str, str]] = set()
        self._entry_points_loaded = False
        self._loading_plugin: str | None = None
        self._loading = False

    # -- registration --------------------------------------------------------------------------------

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` and return it. The same object again is a no-op; another
        object under a taken name raises :class:`DuplicateNameError` naming both places."""
        with self._lock:
            plugin = None if self._is_home(obj) else self._loading_plugin
            origin = describe_object(obj) if plugin is None else f"{describe_object(obj)} from {plugin}"
            new = Entry(obj, origin, plugin is not None)
            old = self._entries.get(name)
            if old is not None:
                if old.obj is obj:
                    return obj
                raise DuplicateNameError(self._duplicate_message(name, old, new))
            self._entries[name] = new
            return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@registry.register("name")``."""

        def wrap(obj: T) -> T:
            return self.add(name, obj)

        return wrap

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's stand-in, say); KeyError if it is not registered."""
        with self._lock:
            del self._entries[name]

    def _is_home(self, obj: object) -> bool:
        module = getattr(obj, "__module__", None) or ""
        return module == self.home or module.startswith(self.home + ".")

    def _duplicate_message(self, name: str, old: Entry[T], new: Entry[T]) -> str:
        if new.plugin and not old.plugin:
            return (
                f"{self.kind} {name!r} is built in ({old.origin}); {new.origin} may not take its name: "
                f"give the plug-in's {self.kind} another name"
            )
        return f"{self.kind} {name!r} registered twice: by {old.origin} and by {new.origin}"

    # -- lookup ----------------------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The object registered under ``name``; :class:`UnknownNameError` lists the known names."""
        self.load()
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")
        return entry.obj

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) in order: objects registered in-process (built-ins first) in registration
        order, then the plug-ins' in the order they loaded."""
        self.load()
        entries = list(self._entries.items())
        return [(n, e.obj) for n, e in entries if not e.plugin] + [(n, e.obj) for n, e in entries if e.plugin]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- loading ---------------------------------------------------------------------------------------

    def load(self) -> None:
        """Import the built-in modules, then the group's entry points (installed distributions are
        read once). A failed entry point raises :class:`PluginLoadError`, and the next lookup tries
        again rather than answer from a partial registry."""
        with self._lock:
            if self._loading:  # a lookup from inside a module being loaded: what is registered so far
                return
            self._loading = True
            try:
                if not self._builtins_loaded:
                    for module in self.builtin_modules:
                        importlib.import_module(module)
                    self._builtins_loaded = True
                if self.group is not None and not self._entry_points_loaded:
                    for ep in metadata.entry_points(group=self.group):
                        self._load_entry_point(ep)
                    self._entry_points_loaded = True
            finally:
                self._loading = False

    def _load_entry_point(self, ep: metadata.EntryPoint) -> None:
        key = (ep.name, ep.value)
        if key in self._loaded_entry_points:
            return
        where = describe_entry_point(ep)
        self._loading_plugin = where
        try:
            try:
                obj = ep.load()
            except DuplicateNameError:  # the plug-in's module registered a taken name: already clear
                raise
            except Exception as err:
                raise PluginLoadError(
                    f"{self.kind} plug-in {where} failed to load: {type(err).__name__}: {err}"
                ) from err
            if isinstance(obj, ModuleType):
                if ep.name not in self._entries:
                    raise PluginLoadError(
                        f"{self.kind} plug-in {where} names module {obj.__name__}, which registered no "
                        f"{self.kind} {ep.name!r}: name the object itself (module:attr) or register it on import"
                    )
            elif not any(e.obj is obj for e in self._entries.values()):
                self.add(ep.name, obj)
        finally:
            self._loading_plugin = None
        self._loaded_entry_points.add(key)
