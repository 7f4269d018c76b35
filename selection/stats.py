"""Summary statistics of a Selection for the metrics stream (weights, utilities, ground truth)."""

from __future__ import annotations

import math

import torch

from optsel.selection.base import Selection


def selection_metrics(
    selection: Selection, kind_ids: torch.Tensor | None = None, kind_names: dict[int, str] | None = None
) -> dict[str, float]:
    """Flat ``select/...`` metrics. kind_ids: [N] ground-truth kind codes of the *global* pool."""
    w = selection.weights.double()
    out: dict[str, float] = {
        "select/pool_size": float(selection.pool_size),
        "select/selected": float(selection.indices.numel()),
        "select/ess": float(1.0 / (w.square().sum())) if w.numel() else 0.0,
        "select/weight_entropy": float(-(w[w > 0] * w[w > 0].log()).sum()) if w.numel() else 0.0,
    }
    if selection.filtered is not None:
        out["select/filtered"] = float(selection.filtered.numel())
    if selection.utility is not None and selection.utility.numel():
        u = selection.utility.double()
        finite = u[torch.isfinite(u)]
        if finite.numel():
            out.update(
                {
                    "select/utility_mean": float(finite.mean()),
                    "select/utility_min": float(finite.min()),
                    "select/utility_max": float(finite.max()),
                }
            )
    diag = selection.diagnostics or {}
    for key in ("gram_condition", "comm_bytes"):
        if key in diag and diag[key] is not None and math.isfinite(float(diag[key])):
            out[f"select/{key}"] = float(diag[key])
    if diag.get("engine_bytes_estimate") and diag.get("comm_bytes") is not None:  # selector / engine traffic
        out["select/engine_bytes_ratio"] = float(diag["comm_bytes"]) / float(diag["engine_bytes_estimate"])
    for phase, nbytes in (diag.get("comm_by_phase") or {}).items():
        out[f"select/comm_phase_bytes/{phase}"] = float(nbytes)
    for reason, count in (diag.get("fallbacks") or {}).items():
        out[f"select/fallback/{reason}"] = float(count)
    if diag.get("solver_status"):
        out[f"select/solver_status/{diag['solver_status']}"] = 1.0
    for phase, seconds in selection.timings.items():
        out[f"time/phase/{phase}"] = float(seconds)
    if kind_ids is not None and selection.indices.numel():
        chosen = kind_ids[selection.indices]
        names = kind_names or {}
        for code in sorted(set(kind_ids.tolist())):
            share = float(w[chosen == code].sum())
            out[f"select/precision/{names.get(code, str(code))}"] = share
    return out
