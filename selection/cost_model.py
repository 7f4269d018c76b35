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

Two-stage FTW (``prefilter: head``, docs/design.md#two-stage): stage 2 is the exact step on the m
survivors, so ``auto`` picks its backends for N = m (the selector passes the survivors' pool);
stage 1 costs :func:`head_stage_cost` (bytes and FLOPs of one rank), and :func:`step_flops` gives a whole
step, one or two stages, in plain training steps on k, from the design's formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NotRequired, TypedDict, Unpack, get_args

from optsel.selection.ftw_config import ExchangeName, FTWConfig

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


@dataclass(frozen=True)
class HeadStageShape:
    """Stage 1 of ``prefilter: head`` in one step: the global pool N = ``n``, W = ``window`` scored tokens per
    sample, the head [V = ``vocab``, d = ``hidden``], ``target_rows`` |V| rows of ``target_len`` tokens (the whole
    target is gathered; stage 1 scores ``scored_target_rows`` of them, 0 when ``prefilter_target: reuse``),
    ``forward_flops_per_token`` (2 × the multiply-adds of stage 1's forward per token: the L blocks run, the final
    norm and the head), m = ``survivors``, R = ``world``, ``esz`` the compute dtype's bytes and
    ``keep_factors`` (``prefilter_stage2: head``: the survivors' head factors are all-gathered for their Gram)."""

    n: int
    window: int
    hidden: int
    vocab: int
    target_rows: int
    target_len: int
    scored_target_rows: int
    forward_flops_per_token: float
    survivors: int
    world: int
    esz: int = 4
    keep_factors: bool = False


def head_stage_cost(shape: HeadStageShape) -> LayerCost:
    """One rank's bytes and FLOPs of stage 1 (selection/ftw/two_stage.py ``HeadPrefilter.run``).

    FLOPs: the forward over this rank's n/R candidates and every rank's scored target rows (W tokens each), and
    per sample the head gradient G_i = Δ_iᵀ H_i formed once (2·W·d·V) for b_i and K_ii (3·d·V more); with
    ``keep_factors`` the survivors' head Gram (m²·(2·W·d·V)/R at most). Bytes (R ≥ 2; pool and target split
    evenly over the ranks): the gathered target batch (ids, mask, labels; int32 on the wire,
    selection/ftw/gathering.py), the head's M and P gathered whole (2·V·d·esz: the dominant term, as for the
    one-stage direction exchange), the 2N float64 (b, K_ii), the row counts each of those all-gathers exchanges
    first, and with ``keep_factors`` the survivors' head factors (m·W·(d + V)·esz). The forward's own parameter
    gathers (ZeRO-3/FSDP2) are the engine's and are not counted here."""
    R = max(int(shape.world), 1)
    W, d, V = shape.window, shape.hidden, shape.vocab
    per_sample = W * shape.forward_flops_per_token + 2.0 * W * d * V + 3.0 * d * V
    flops = (shape.n / R) * per_sample + shape.scored_target_rows * (
        W * shape.forward_flops_per_token + 2.0 * W * d * V
    )
    nbytes = 0.0
    if R > 1:
        sizes = R * 8  # every variable-size all-gather first exchanges the R row counts (int64)
        target = shape.target_rows * shape.target_len * 3 * 4 + 3 * sizes + 4 * 8  # + the agreed width and dtypes
        nbytes = target + 2 * V * d * shape.esz + 2 * shape.n * 8 + sizes
    if shape.keep_factors:
        m = shape.survivors
        flops += m * m * 2.0 * W * d * V / R
        nbytes += m * W * (d + V) * shape.esz if R > 1 else 0.0
    return LayerCost(bytes=nbytes, flops=flops)


@dataclass(frozen=True)
class StepShape:
    """One FTW step in the units of docs/design.md#two-stage, all relative to k: r = N/k, v = |V|/k target rows
    (amortised over ``target_refresh``), mu = m/k survivors (two stages), w = W/T the scoring window's share of a
    sample, s = stage 1's target rows / k (0: reused), depth = L/n the share of the decoder blocks stage 1 runs,
    head = h the output layer's share of a forward's FLOPs (:func:`head_share`), stage2: None (one stage),
    "exact", "head" or "score"; label_every: R, the labelling period of ``prefilter_stage2: score`` (0: never)."""

    r: float
    v: float
    mu: float = 0.0
    w: float = 1.0
    s: float = 0.0
    depth: float = 1.0
    head: float = 0.0
    stage2: str | None = None
    label_every: float = 0.0

    @classmethod
    def of(cls, config: FTWConfig, n: int, num_target: int, seq_len: int, layers: int, head: float) -> StepShape:
        """The shape of ``config``'s step on a pool of ``n``, |V| = ``num_target`` rows of ``seq_len`` tokens, a
        model of ``layers`` decoder blocks whose head is ``head`` of a forward's FLOPs."""
        k = min(config.budget, n)
        v = num_target / k / max(config.target_refresh, 1)
        if config.prefilter == "none":
            return cls(r=n / k, v=v, head=head)
        if config.prefilter == "learned":  # stage 1 runs no model: w = 0 (hashing and a D × D solve, no FLOPs)
            stage2 = "score" if config.prefilter_stage2 == "score" else "exact"
            every = float(config.prefilter_label_every or 0)
            return cls(r=n / k, v=v, mu=config.num_filtered(n) / k, w=0.0, head=head, stage2=stage2, label_every=every)
        window = config.prefilter_window
        rows = 0 if config.prefilter_target == "reuse" else (config.prefilter_target_rows or num_target)
        return cls(
            r=n / k,
            v=v,
            mu=config.num_filtered(n) / k,
            w=1.0 if window is None else min(window, seq_len) / seq_len,
            s=min(rows, num_target) / k / (max(config.target_refresh, 1) if config.prefilter_target == "reuse" else 1),
            depth=1.0 if config.prefilter_depth is None else min(config.prefilter_depth, layers) / layers,
            head=head,
            stage2=config.prefilter_stage2,
        )


def step_flops(shape: StepShape) -> float:
    """A step's FLOPs in plain training steps on k (one plain step = 3f, f = a forward over the k rows):

    - one stage: (3r + 3v + 1)/3 — capture (forward + activation backward) of pool and target, each candidate's
      and the target's gradient formed once (≈ a forward each), the trainer's weight gradient on k;
    - stage 1: (r + s)·w·(a + h) with a = depth·(1 − h) + h the forward it runs (h: the head, run at any depth)
      and h once more for forming each head gradient (``prefilter: learned``: w = 0, no model FLOPs; its
      ``prefilter_learn_steps`` one-stage steps are not amortised here);
    - stage 2 exact: (3μ + 3v + 1) as one stage on the survivors; stage 2 head: 3 (the trainer's own step);
    - ``prefilter_stage2: score``: 1 (the trainer's own step), with a one-stage labelling step every R steps
      amortised: (one stage + (R − 1))/R (the learning steps are not amortised).
    """
    one_stage = (3 * shape.r + 3 * shape.v + 1) / 3
    if shape.stage2 is None:
        return one_stage
    if shape.stage2 == "score":  # the trainer's own step, and a one-stage labelling step every R (0: never)
        R = shape.label_every
        return (one_stage + (R - 1) * 1.0) / R if R >= 1 else 1.0
    a = shape.depth * (1 - shape.head) + shape.head
    stage1 = (shape.r + shape.s) * shape.w * (a + shape.head)
    stage2 = 3 * shape.mu + 3 * shape.v + 1 if shape.stage2 == "exact" else 3.0
    return (stage1 + stage2) / 3


def head_share(hidden: int, layers: int, intermediate: int, kv_dim: int, vocab: int, seq_len: int) -> float:
    """h: the output layer's share of a Llama forward's FLOPs per token (linear layers, and attention's
    2·2·T·d per block for QKᵀ and AV at sequence length T)."""
    block = 2 * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate) + 4 * seq_len * hidden
    head = 2 * hidden * vocab
    return head / (layers * block + head)


__all__ = [
    "ACCURACY_ORDER",
    "ACCURACY_SLACK",
    "EXCHANGES",
    "FLOPS_PER_BYTE",
    "REFERENCE_WORLD",
    "HeadStageShape",
    "LayerCost",
    "LayerShape",
    "LayerShapeFields",
    "StepShape",
    "backend_for",
    "choose_backend",
    "cost_of",
    "head_share",
    "head_stage_cost",
    "layer_cost",
    "step_flops",
]
