"""The model view: what selection needs from a training engine, and nothing else (docs/design.md,
"Distributed rules").

A selector runs the model and reads the optimizer. On one process (or under plain data parallelism)
that needs nothing but the model and a torch Adam / AdamW. A sharded engine changes three things,
and its :class:`ModelView` (written beside the engine, in pipeline/engines/) says how:

- **full shapes**: a sharded weight's local tensor is only its part; ``full_shape`` gives the whole;
- **optimizer state**: ``state_reader`` returns the :class:`OptimizerStateReader` that hands out this
  rank's blocks of the moments (and gathers a parameter-shaped matrix the way the weight is sharded);
- **the passes**: ``prepare`` runs before covered weights are looked up (so ``module.weight`` is the
  tensor the optimizer holds); ``after_selection`` returns the model to the between-steps state
  after a selector's own forward/backward over the pool (re-shard, drop any gradient left behind).

Engines register a detector with :func:`register_model_view` (a plug-in through the
``optsel.model_views`` entry-point group); :func:`model_view_for` asks each in turn, the in-process
ones first, and falls back to the plain view. Selection code names no engine: a third engine brings its own
view and nothing in selection/ changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from optsel import distributed
from optsel.registry import Registry, describe_object
from optsel.selection.muon_geometry import HybridStateReader, is_muon, optimizers_of
from optsel.selection.preconditioner import IdentityStateReader, OptimizerStateReader, TorchAdamStateReader


class ModelView:
    """The plain view: an unsharded ``model`` and a torch ``optimizer`` (either may be None when the
    caller needs only the other). Engines subclass it."""

    name = "plain"
    #: whether the model's forward runs collectives (ZeRO-3's parameter gathers, FSDP2's unshards): then every
    #: rank must run the same number of forwards, and a selector's passes are agreed across ranks
    collective_forward = False

    def __init__(self, model: nn.Module | None = None, optimizer: Any = None):
        self.model = model
        self.optimizer = optimizer

    def full_shape(self, param: torch.Tensor) -> Sequence[int]:
        """The parameter's whole shape (a sharded engine's local tensor may hold only part of it)."""
        return tuple(param.shape)

    def prepare(self) -> None:
        """Before covered weights are looked up: make each ``module.weight`` the tensor the optimizer holds."""

    def state_reader(self) -> OptimizerStateReader:
        """The reader of this rank's Adam moments (geometry 'adam'); TypeError for another optimizer."""
        try:
            return TorchAdamStateReader(self.optimizer)
        except TypeError as err:
            raise TypeError(
                f"{err} (a sharded engine's optimizer is read through its model view: importing "
                f"optsel.pipeline.engines registers the built-in engines' views)"
            ) from err

    def after_selection(self) -> None:
        """After a selector's own passes over the pool: back to the between-steps state. The plain
        model needs nothing (capture never writes a parameter's ``.grad``)."""

    def engine_bytes_per_step(self) -> int:
        """The engine's own traffic per optimizer step, bytes, in the CommCounter's payload convention
        (the denominator of ``select/engine_bytes_ratio``). Plain data parallelism all-reduces every
        gradient once at the parameter's dtype; one process moves nothing."""

        if self.model is None or not distributed.is_distributed():
            return 0
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


#: a detector looks at (model, optimizer) and returns its engine's view, None when it is not its
#: engine, or raises TypeError for a setup of its engine that selection cannot read
ViewDetector = Callable[[nn.Module | None, Any], ModelView | None]
#: view detectors by name: the engines' own (registered when optsel.pipeline.engines is imported) and
#: the ``optsel.model_views`` entry points, asked in that order
MODEL_VIEWS: Registry[ViewDetector] = Registry("model view", group="optsel.model_views")


def view_name(detector: ViewDetector) -> str:
    """The name :func:`register_model_view` files ``detector`` under: ``module.qualname``."""
    return describe_object(detector)


def register_model_view(detector: ViewDetector) -> ViewDetector:
    """Add an engine's view detector (engines do this when their module is imported); the same
    detector twice is one."""
    return MODEL_VIEWS.add(view_name(detector), detector)


def model_view_for(model: nn.Module | None = None, optimizer: Any = None) -> ModelView:
    """The view of the first detector that recognises ``model`` / ``optimizer`` (the in-process ones
    in registration order, then the plug-ins'), else plain."""
    for _, detect in MODEL_VIEWS.items():
        view = detect(model, optimizer)
        if view is not None:
            return view
    return ModelView(model, optimizer)


def make_state_reader(optimizer: Any, geometry: str, view: ModelView | None = None) -> OptimizerStateReader:
    """The reader for ``optimizer`` under ``geometry`` ("adam": the view's reader; "sgd": P = I; "muon" /
    "auto": selection/muon_geometry.py's hybrid reader when a torch.optim.Muon is among the optimizers)."""
    if geometry not in ("adam", "sgd", "muon", "auto"):
        raise ValueError(f"geometry: must be 'adam', 'sgd', 'muon' or 'auto', got {geometry!r}")

    view = view or model_view_for(None, optimizer)
    if geometry == "sgd":
        return IdentityStateReader(view.full_shape)
    has_muon = any(is_muon(opt) for opt in optimizers_of(optimizer))
    if geometry == "muon" and not has_muon:
        raise ValueError(
            f"geometry: 'muon' needs a torch.optim.Muon among the optimizers, got "
            f"{type(optimizer).__name__}; use 'adam' or 'auto'"
        )
    if geometry in ("muon", "auto") and has_muon:  # the engine's own Adam reader for the AdamW half
        return HybridStateReader(optimizer, geometry, lambda opt: type(view)(view.model, opt).state_reader())
    return view.state_reader()


def cleans_up(select: Callable) -> Callable:
    """Decorator for a selector's ``select`` that runs the model: ``self.view.after_selection()``
    afterwards, however ``select`` ends, so the caller gets the model back between steps."""

    @functools.wraps(select)
    def wrapper(self, *args, **kwargs):
        try:
            return select(self, *args, **kwargs)
        finally:
            self.view.after_selection()

    return wrapper


__all__ = [
    "MODEL_VIEWS",
    "ModelView",
    "ViewDetector",
    "cleans_up",
    "make_state_reader",
    "model_view_for",
    "register_model_view",
    "view_name",
]
