"""Training engines (DeepSpeed ZeRO-3, FSDP2) and their model views for selection.

Importing this package registers both engines' views (selection/model_view.py), so that a selector
handed a sharded model or optimizer reads it the engine's way. The views import no engine library
at module level."""

from optsel.pipeline.engines import fsdp2_view, zero3_view  # noqa: F401  (registers the model views)
