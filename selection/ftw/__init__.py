"""Filter-then-Weight: the selector (selector.py), its per-step context (context.py), its exchanges
(exchanges/), the filter (filter.py) and the two-stage head prefilter (prefilter.py, two_stage.py).

``FilterThenWeight`` and ``FTWConfig`` are importable from here; importing this package registers the
``"ftw"`` selector.
"""

from optsel.selection.ftw.selector import FilterThenWeight, build_ftw
from optsel.selection.ftw_config import FTWConfig

__all__ = ["FTWConfig", "FilterThenWeight", "build_ftw"]
