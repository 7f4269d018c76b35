"""optsel's Prometheus metrics: one table mapping the trainer's slash keys to metric families, and
``OptselMetrics``, which owns those families in a caller-given ``CollectorRegistry`` and updates
them from one per-step dict.

Conventions (https://prometheus.io/docs/practices/naming/): prefix ``optsel_``, base units (seconds,
bytes, ratios in [0, 1]), counters end in ``_total``, run metadata in ``optsel_run_info``. Labels are
bounded: ``run`` (the run_name: two runs on one Prometheus stay apart), ``engine`` and ``method`` on
every family (one value each per process), ``rank`` on per-rank families, and one of
``phase`` / ``kind`` / ``reason`` / ``status`` where the key carries it; each of those takes at most
``MAX_LABEL_VALUES`` distinct values per family (more fold into ``"other"``, logged once). Never a
sample id.

Scopes: ``job`` families hold values that are identical on every rank (all-reduced by the trainer)
and are exported by rank 0 only; ``rank`` families hold this process's own measurements (step and
phase times, memory, bytes moved, last-step timestamp) and carry a ``rank`` label.

Keys not in the table are not exported to Prometheus (they still reach the JSONL sink): each such key
is logged once at WARNING and counted in ``optsel_monitoring_unknown_keys_total``; a generic
``key`` label would be unbounded. Values a counter or histogram cannot take (NaN, Inf, negative) are
dropped, logged once per key and counted in ``optsel_monitoring_invalid_values_total``; gauges take
any float, NaN included (e.g. ``optsel_grad_norm`` on a skipped step).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from optsel.config_loader import mask_secrets

log = logging.getLogger(__name__)

Kind = Literal["gauge", "counter", "cumulative", "histogram"]
"""counter: the key is this step's amount (inc by it); cumulative: the key is a running total
(inc by the increase since the last value seen in this process)."""
Scope = Literal["job", "rank"]

MAX_LABEL_VALUES = 64
#: longest label value exported; a longer one (a 5,000-character kind name) is cut to this length with a
#: short hash of the whole value appended, so two long values stay apart
MAX_LABEL_LENGTH = 120
BASE_LABELS = ("run", "engine", "method")
# Step times range from milliseconds (tiny CPU tests) to minutes (large models): seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, float("inf"))


@dataclass(frozen=True)
class MetricSpec:
    """One Prometheus family fed from one key (or one key prefix, whose rest is the ``label`` value)."""

    name: str
    kind: Kind
    scope: Scope
    help: str
    label: str | None = None


# Exact keys of the per-step dict (docs/architecture.md, "Metrics") → metric family.
KEYS: dict[str, MetricSpec] = {
    "train/loss": MetricSpec(
        "optsel_train_loss",
        "gauge",
        "job",
        "Training loss of the last step: sum of w_i * loss_i over the global selection (nats/token).",
    ),
    "train/lr": MetricSpec("optsel_learning_rate", "gauge", "job", "Learning rate of the last step."),
    "train/grad_norm": MetricSpec(
        "optsel_grad_norm", "gauge", "job", "Global gradient norm of the last step (NaN on a skipped step)."
    ),
    "train/tokens": MetricSpec(
        "optsel_trained_tokens_total", "counter", "job", "Loss-bearing tokens trained on, summed over ranks."
    ),
    "train/samples": MetricSpec(
        "optsel_trained_samples_total", "counter", "job", "Selected samples trained on, summed over ranks."
    ),
    "train/tokens_per_second": MetricSpec(
        "optsel_tokens_per_second", "gauge", "job", "Trained tokens per second of wall time in the last step."
    ),
    "train/samples_per_second": MetricSpec(
        "optsel_samples_per_second", "gauge", "job", "Trained (selected) samples per second in the last step."
    ),
    "train/pool_samples_per_second": MetricSpec(
        "optsel_candidates_per_second", "gauge", "job", "Candidate (pool) samples consumed per second in the last step."
    ),
    "train/skipped_steps": MetricSpec(
        "optsel_skipped_steps_total", "cumulative", "job", "Steps skipped because the loss or the gradient was NaN/Inf."
    ),
    "data/truncated_samples": MetricSpec(
        "optsel_truncated_samples_total",
        "cumulative",
        "rank",
        "Pool samples on this rank cut to data.max_seq_len / the model's positions.",
    ),
    "data/empty_samples": MetricSpec(
        "optsel_empty_samples_total",
        "cumulative",
        "rank",
        "Pool samples on this rank without any loss token (all labels -100).",
    ),
    "checkpoint/save_seconds": MetricSpec(
        "optsel_checkpoint_save_seconds",
        "gauge",
        "job",
        "Wall time of the last checkpoint save (all ranks, atomic rename included).",
    ),
    "time/step_seconds": MetricSpec(
        "optsel_step_duration_seconds",
        "histogram",
        "rank",
        "Wall time of one optimizer step on this rank, data loading included.",
    ),
    "select/pool_size": MetricSpec(
        "optsel_candidates_seen_total", "counter", "job", "Candidate samples drawn into the global selection pool."
    ),
    "select/filtered": MetricSpec(
        "optsel_candidates_filtered_total",
        "counter",
        "job",
        "Candidates kept by the filter stage (passed on to weighting).",
    ),
    "select/selected": MetricSpec(
        "optsel_candidates_selected_total", "counter", "job", "Candidates selected for training (nonzero weight)."
    ),
    "select/ess": MetricSpec(
        "optsel_selection_effective_sample_size",
        "gauge",
        "job",
        "Effective sample size 1/sum(w^2) of the last step's weights.",
    ),
    "select/weight_entropy": MetricSpec(
        "optsel_selection_weight_entropy_nats",
        "gauge",
        "job",
        "Entropy -sum(w log w) of the last step's weights (nats).",
    ),
    "select/utility_mean": MetricSpec(
        "optsel_selection_utility_mean", "gauge", "job", "Mean finite utility score over the last step's pool."
    ),
    "select/utility_min": MetricSpec(
        "optsel_selection_utility_min", "gauge", "job", "Minimum finite utility score over the last step's pool."
    ),
    "select/utility_max": MetricSpec(
        "optsel_selection_utility_max", "gauge", "job", "Maximum finite utility score over the last step's pool."
    ),
    "select/gram_condition": MetricSpec(
        "optsel_selection_gram_condition_number", "gauge", "job", "Condition number of the last step's Gram matrix."
    ),
    "select/comm_bytes": MetricSpec(
        "optsel_selection_comm_bytes_total", "counter", "rank", "Bytes this rank handed to the selector's collectives."
    ),
    "time/overhead_ratio": MetricSpec(
        "optsel_step_overhead_ratio",
        "gauge",
        "rank",
        "(select + train + optimizer seconds) / (train + optimizer seconds) of the last step: the step against a plain "
        "step on the rows it trained on. Exact where the training half is the engine's own forward/backward "
        "(random, FTW with prefilter_stage2 head, two-pass FTW); an upper bound under FTW's single pass, whose "
        "training half is only the weight gradients.",
    ),
    "select/engine_bytes_ratio": MetricSpec(
        "optsel_selection_engine_bytes_ratio",
        "gauge",
        "rank",
        "Selector bytes of the last step / the engine's own parameter traffic per step (analytic: ZeRO-3 / FSDP2 "
        "3 x parameter bytes, all-gather forward and backward + gradient reduce-scatter; DDP 1 x).",
    ),
    "eval/loss": MetricSpec(
        "optsel_eval_loss",
        "gauge",
        "job",
        "Loss on the held-out target validation samples at the last evaluation (nats/token).",
    ),
    "eval/exact_match": MetricSpec(
        "optsel_eval_exact_match_ratio",
        "gauge",
        "job",
        "Exact-match rate on the held-out samples at the last evaluation.",
    ),
    "sys/rss_bytes": MetricSpec(
        "optsel_process_resident_memory_bytes", "gauge", "rank", "Resident memory of this rank's process."
    ),
    "sys/cuda_peak_bytes": MetricSpec(
        "optsel_cuda_peak_allocated_bytes", "gauge", "rank", "Peak CUDA memory allocated by this rank's process."
    ),
    "train/last_step_timestamp_seconds": MetricSpec(
        "optsel_last_step_timestamp_seconds",
        "gauge",
        "rank",
        "Unix time at which this rank completed its last step (stuck-job alerts).",
    ),
}

# Key prefixes: the remainder of the key is the value of the family's label.
PREFIXES: dict[str, MetricSpec] = {
    "time/phase/": MetricSpec(
        "optsel_step_phase_duration_seconds",
        "histogram",
        "rank",
        "Wall time of one phase of a step on this rank (nested: select contains the "
        "selector's capture, gather, alignment, gram, solve).",
        label="phase",
    ),
    "select/fallback/": MetricSpec(
        "optsel_selection_fallbacks_total",
        "counter",
        "job",
        "Fallbacks taken by the selector, by reason.",
        label="reason",
    ),
    "select/solver_status/": MetricSpec(
        "optsel_selection_solver_status_total", "counter", "job", "Weight-solver outcomes, by status.", label="status"
    ),
    "select/comm_phase_bytes/": MetricSpec(
        "optsel_selection_phase_comm_bytes_total",
        "counter",
        "rank",
        "Bytes this rank handed to the selector's collectives, by FTW phase.",
        label="phase",
    ),
    "select/precision/": MetricSpec(
        "optsel_selection_precision_ratio",
        "gauge",
        "job",
        "Share of the last step's weight on each ground-truth kind.",
        label="kind",
    ),
}

# Keys the trainer sends that are deliberately not exported (redundant with an exported family).
REDUNDANT: dict[str, str] = {
    "train/samples_seen": "optsel_candidates_seen_total",
}

# Families the sink maintains itself (not fed from a key).
STEP = MetricSpec("optsel_last_step", "gauge", "rank", "Number of the last step this rank logged.")
STEPS = MetricSpec("optsel_steps_total", "counter", "rank", "Steps this rank logged (step numbers that advanced).")
UNKNOWN = MetricSpec(
    "optsel_monitoring_unknown_keys_total",
    "counter",
    "rank",
    "Metric values whose key has no Prometheus family (not exported; see JSONL).",
)
INVALID = MetricSpec(
    "optsel_monitoring_invalid_values_total",
    "counter",
    "rank",
    "NaN, Inf or negative values dropped from a counter or histogram.",
)
RUN_INFO_NAME = "optsel_run"  # prometheus_client's Info appends _info → optsel_run_info

ALL_SPECS: tuple[MetricSpec, ...] = (*KEYS.values(), *PREFIXES.values(), STEP, STEPS, UNKNOWN, INVALID)


def exported_names() -> set[str]:
    """Every sample name optsel may expose (histograms with _bucket/_sum/_count, counters with
    _total, plus _created), for checks of dashboards and alert rules."""
    names = {RUN_INFO_NAME + "_info"}
    for spec in ALL_SPECS:
        if spec.kind == "histogram":
            names |= {spec.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif spec.kind in ("counter", "cumulative"):
            names |= {spec.name, spec.name.removesuffix("_total") + "_created"}
        else:
            names.add(spec.name)
    return names


class OptselMetrics:
    """The optsel families in ``registry``, updated by ``update(metrics, step)``.

    rank: this process's global rank (value of the ``rank`` label).
    job_level: also create and update the job-scope families (rank 0 only, by convention).
    labels: values of ``run`` (the run_name), ``engine`` and ``method`` (missing ones are ``""``).
    """

    def __init__(
        self, registry: CollectorRegistry, *, rank: int, job_level: bool, labels: dict[str, str] | None = None
    ):
        labels = labels or {}
        unknown = set(labels) - set(BASE_LABELS)
        if unknown:
            raise ValueError(f"labels: only {BASE_LABELS} are allowed as constant labels, got {sorted(unknown)}")
        self.rank, self.job_level = int(rank), job_level
        self._base = {k: bounded_label(mask_secrets(str(labels.get(k, "")))) for k in BASE_LABELS}  # no credential
        self._families: dict[str, Gauge | Counter | Histogram] = {}
        self._seen_values: dict[str, set[str]] = {}
        self._last_cumulative: dict[str, float] = {}
        self._warned: set[str] = set()
        self._last_step: int | None = None
        for spec in ALL_SPECS:
            if spec.scope == "rank" or job_level:
                self._families[spec.name] = _make(spec, registry)
                if spec.kind in ("counter", "cumulative") and spec.label is None:
                    self._child(spec)  # exported as 0 from the start, so rate()/increase() see the first step
        self._info = Info(
            RUN_INFO_NAME,
            "optsel run metadata (version, engine, method, world size).",
            labelnames=("run", "rank"),
            registry=registry,
        )

    # -- public ---------------------------------------------------------------------------------
    def update(self, metrics: dict[str, float], step: int) -> None:
        """Apply one step's dict (slash keys, base units). Keys of the other scope are skipped."""
        for key, value in metrics.items():
            spec, extra = _lookup(key)
            if spec is None:
                if key not in REDUNDANT:
                    self._count(UNKNOWN, key, f"metric key {key!r} has no Prometheus family; not exported")
                continue
            if spec.name not in self._families:  # a job-scope key on a rank > 0
                continue
            self._apply(spec, key, extra, value)
        step = int(step)
        if self._last_step is None or step > self._last_step:
            if self._last_step is not None or step > 0:
                self._child(STEP).set(step)
                self._child(STEPS).inc()
                if "train/last_step_timestamp_seconds" not in metrics:
                    self._child(KEYS["train/last_step_timestamp_seconds"]).set(time.time())
            self._last_step = step

    def set_info(self, info: dict[str, str]) -> None:
        """Run metadata as ``optsel_run_info{run, rank, version, engine, method, world_size, ...} 1``;
        keys must be valid label names (letters, digits, underscores)."""
        bad = [k for k in info if not k.replace("_", "a").isalnum() or k[:1].isdigit() or k in ("run", "rank")]
        if bad:
            raise ValueError(f"info: keys {bad} are not usable as Prometheus label names")
        self._info.labels(run=self._base["run"], rank=str(self.rank)).info(
            {k: bounded_label(mask_secrets(str(v))) for k, v in info.items()}
        )

    @property
    def base_labels(self) -> dict[str, str]:
        """The constant label values every family carries (bounded, credentials masked)."""
        return dict(self._base)

    # -- internals ------------------------------------------------------------------------------
    def _apply(self, spec: MetricSpec, key: str, extra: str | None, raw: float) -> None:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            self._count(INVALID, key, f"metric {key!r}: value {raw!r} is not a number; dropped")
            return
        if spec.kind == "gauge":
            self._child(spec, extra).set(value)
            return
        if not math.isfinite(value) or value < 0:
            self._count(INVALID, key, f"metric {key!r}: {value!r} is not a valid {spec.kind} value; dropped")
            return
        if spec.kind == "counter":
            self._child(spec, extra).inc(value)
        elif spec.kind == "cumulative":
            last = self._last_cumulative.get(key, 0.0)
            child = self._child(spec, extra)
            if value > last:
                child.inc(value - last)
            self._last_cumulative[key] = value
        else:
            self._child(spec, extra).observe(value)

    def _child(self, spec: MetricSpec, extra: str | None = None):
        values = dict(self._base)
        if spec.scope == "rank":
            values["rank"] = str(self.rank)
        if spec.label is not None:
            values[spec.label] = self._bounded(spec, extra or "")
        return self._families[spec.name].labels(**values)

    def _bounded(self, spec: MetricSpec, value: str) -> str:
        value = bounded_label(mask_secrets(value))
        seen = self._seen_values.setdefault(spec.name, set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            self._warn_once(
                f"{spec.name}:{spec.label}",
                f"{spec.name}: more than {MAX_LABEL_VALUES} values of label {spec.label!r}; "
                f"{value!r} and later ones are exported as 'other'",
            )
            return "other"
        seen.add(value)
        return value

    def _count(self, spec: MetricSpec, key: str, message: str) -> None:
        self._warn_once(key, message)
        self._child(spec).inc()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def bounded_label(value: str) -> str:
    """``value`` if it has at most ``MAX_LABEL_LENGTH`` characters, else its head and "…" and the first
    8 hex digits of its SHA-256 (``MAX_LABEL_LENGTH`` characters in all)."""
    if len(value) <= MAX_LABEL_LENGTH:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{value[: MAX_LABEL_LENGTH - 9]}…{digest}"


def _lookup(key: str) -> tuple[MetricSpec | None, str | None]:
    spec = KEYS.get(key)
    if spec is not None:
        return spec, None
    for prefix, spec in PREFIXES.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return spec, key[len(prefix) :]
    return None, None


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Gauge | Counter | Histogram:
    names = list(BASE_LABELS) + (["rank"] if spec.scope == "rank" else []) + ([spec.label] if spec.label else [])
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, names, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, names, registry=registry, buckets=STEP_BUCKETS)
    return Counter(spec.name, spec.help, names, registry=registry)


__all__ = [
    "ALL_SPECS",
    "KEYS",
    "MAX_LABEL_LENGTH",
    "MAX_LABEL_VALUES",
    "bounded_label",
    "MetricSpec",
    "OptselMetrics",
    "PREFIXES",
    "REDUNDANT",
    "exported_names",
]
