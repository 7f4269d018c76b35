"""Bytes and FLOPs of one FTW step per covered layer, per exchange and Gram backend (docs/design.md#distributed).

Used twice: ``gram: auto`` picks each layer's backend with :func:`choose_backend`, and
``benchmarks/cost_model.py`` sums :func:`layer_cost` over Llama shapes against the engines' own traffic.

Conventions: bytes are the payload each rank hands to collectives (optsel.distributed.CommCounter:
all-gather = the gathered output, all-reduce = the tensor), per step; FLOPs are one rank's
multiply-adds × 2. ``n`` is the global pool N, ``m`` the filter's survivors, ``world`` R, ``esz``
the bytes of an element of the compute dtype and ``wire_esz`` those of the direction's wire dtype.
Terms that do not depend on the layer (2N scalars of b / diag K, the broadcast of the choice) and the
target's traffic (per target refresh) are added by the callers.

Per layer (Σd = d_in + d_out, n_l = n / R this rank's candidates, k² = k_o·k_i):

| exchange  | what crosses ranks                                                           |
|-----------|------------------------------------------------------------------------------|
| factors   | every candidate's (A, Δ): n·T·Σd; + rank-one r, c (ghost, sketch); + sketches n·k² (sketch) |
| sketches  | n·k² sketches, 2·k² target / momentum sketch sums, r, c                       |
| direction | M = P ⊙ (G_V − ρ m̂): d_in·d_out; exact: + P (d_in·d_out) + survivors' factors m·T·Σd; |
|           | ghost: + r, c + survivors' factors; sketch: + r, c + survivors' sketches m·k²       |

``auto`` (:func:`choose_backend`; FTW evaluates it at R = REFERENCE_WORLD whatever the real R ≥ 2, so that
any R ≥ 2 selects alike, and at R = 1 on one process, where nothing crosses ranks): time = FLOPs + FLOPS_PER_BYTE · bytes; among the backends that fit
(ghost needs T² ≤ max_temp_elems), the most accurate (exact, then ghost, then sketch) whose time is at
most ACCURACY_SLACK × the cheapest's. With the factors already shipped (exchange: factors) the bytes
hardly differ and FLOPs decide (exact while d_in·d_out is small next to T·Σd, as the old 2T² rule);
with exchange: direction the survivors' factors (m·T·Σd) are weighed against m·k² sketches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NotRequired, TypedDict, Unpack, get_args

from optsel.selection.ftw_config import ExchangeName

#: a byte across ranks costs the time of this many FLOPs (≈ 1e12 FLOP/s of a rank's selector kernels
#: against ≈ 10 GB/s of inter-node bandwidth per rank)
FLOPS_PER_BYTE = 100.0
#: auto takes the most accurate backend costing at most this many times the cheapest
ACCURACY_SLACK = 2.0
ACCURACY_ORDER = ("exact", "ghost", "sketch")
#: on R ≥ 2 ranks FTW's ``auto`` decides for this many, whatever R is, so that a run selects the same on any
#: R ≥ 2 (the bytes per rank hardly change with R); one process moves no bytes and decides for R = 1
REFERENCE_WORLD = 8
EXCHANGES = get_args(ExchangeName)


@dataclass(frozen=True)
class LayerShape:
    """One covered layer in one step: T tokens per sample, the layer's d_in and d_out, the global pool
    N = ``n``, ``m`` survivors, R = ``world`` ranks, the sketch's k_o × k_i, the bytes of an element of
    the compute dtype (``esz``) and of the direction's wire dtype (``wire_esz``; None: ``esz``)."""

    T: int
    d_in: int
    d_out: int
    n: int
    m: int
    world: int
    k_out: int
    k_in: int
    esz: int = 4
    wire_esz: int | None = None


class LayerShapeFields(TypedDict):
    """:class:`LayerShape`'s fields as keyword arguments (:func:`layer_cost`, :func:`choose_backend`)."""

    T: int
    d_in: int
    d_out: int
    n: int
    m: int
    world: int
    k_out: int
    k_in: int
    esz: NotRequired[int]
    wire_esz: NotRequired[int | None]


@dataclass(frozen=True)
class LayerCost:
    bytes: float
    flops: float

    def time(self) -> float:
        return self.flops + FLOPS_PER_BYTE * self.bytes


def layer_cost(exchange: str, backend: str, **shape: Unpack[LayerShapeFields]) -> LayerCost:
    """:func:`cost_of` with the layer's shape as keywords (:class:`LayerShape`'s fields)."""
    return cost_of(exchange, backend, LayerShape(**shape))


def cost_of(exchange: str, backend: str, shape: LayerShape) -> LayerCost:
    """Bytes and FLOPs of one covered layer in one step (see the module docstring)."""
    T, d_in, d_out, n, m = shape.T, shape.d_in, shape.d_out, shape.n, shape.m
    k_out, k_in, esz = shape.k_out, shape.k_in, shape.esz
    wire_esz = esz if shape.wire_esz is None else shape.wire_esz
    R = max(int(shape.world), 1)
    sd, dd, k2 = d_in + d_out, d_in * d_out, k_out * k_in
    n_l = n / R
    multi = R > 1
    rank_one = (sd + 1) * esz if multi and backend != "exact" else 0.0
    sketch_flops = 2.0 * T * (k_out * d_out + k_in * d_in + k2)  # one sample's S_i
    if exchange == "sketches":
        return LayerCost(
            bytes=(n * k2 + 2 * k2) * esz + (sd + 1) * esz if multi else 0.0,
            flops=n_l * sketch_flops + n * 2.0 * k2 + m * m * 2.0 * k2,
        )
    if exchange == "factors":
        shipped = n * T * sd * esz + rank_one + (n * k2 * esz if backend == "sketch" else 0.0)
        align = n * 2.0 * T * dd / R  # over this rank's blocks, every candidate
        if backend == "exact":
            extra = n * 2.0 * T * dd / R + m * 2.0 * T * dd / R + m * m * 2.0 * dd / R
        elif backend == "ghost":
            extra = (n + m * m) * 2.0 * T * T * sd
        else:
            extra = n_l * sketch_flops + m * m * 2.0 * k2
        return LayerCost(bytes=shipped if multi else 0.0, flops=align + extra)
    if exchange != "direction":
        raise ValueError(f"exchange: must be one of {EXCHANGES}, got {exchange!r}")
    align = n_l * 2.0 * T * dd  # this rank's candidates against the whole M
    nbytes: float
    if backend == "exact":  # + the whole P for diag K, the survivors' factors for their Gram
        nbytes = 2 * dd * wire_esz + m * T * sd * esz
        extra = n_l * 2.0 * T * dd + m * 2.0 * T * dd / R + m * m * 2.0 * dd / R
    elif backend == "ghost":
        nbytes = dd * wire_esz + rank_one + m * T * sd * esz
        extra = (n_l + m * m) * 2.0 * T * T * sd
    else:
        nbytes = dd * wire_esz + rank_one + m * k2 * esz
        extra = n_l * sketch_flops + m * m * 2.0 * k2
    return LayerCost(bytes=nbytes if multi else 0.0, flops=align + extra)


def choose_backend(exchange: str, *, max_temp_elems: int, **shape: Unpack[LayerShapeFields]) -> str:
    """:func:`backend_for` with the layer's shape as keywords (:class:`LayerShape`'s fields)."""
    return backend_for(exchange, LayerShape(**shape), max_temp_elems)


def backend_for(exchange: str, shape: LayerShape, max_temp_elems: int) -> str:
    """``gram: auto``'s per-layer choice (module docstring). exchange "sketches" allows only sketch;
    ghost only while T² fits ``max_temp_elems``."""
    if exchange == "sketches":
        return "sketch"
    allowed = [b for b in ACCURACY_ORDER if b != "ghost" or shape.T * shape.T <= max_temp_elems]
    times = {b: cost_of(exchange, b, shape).time() for b in allowed}
    cheapest = min(times.values())
    return next(b for b in allowed if times[b] <= ACCURACY_SLACK * cheapest)


__all__ = [
    "ACCURACY_ORDER",
    "ACCURACY_SLACK",
    "EXCHANGES",
    "FLOPS_PER_BYTE",
    "REFERENCE_WORLD",
    "LayerCost",
    "LayerShape",
    "LayerShapeFields",
    "backend_for",
    "choose_backend",
    "cost_of",
    "layer_cost",
]
