"""Baseline selectors (registered by name on import): loss, gradnorm, greats, uds, less and the FTW
ablations ftw_sgd, ftw_filter_only, ftw_weight_only. Each module's docstring says what it computes
and where it deviates from its paper."""

from optsel.selection.baselines import ablations, greats, less, scores, uds  # noqa: F401  (registration)
