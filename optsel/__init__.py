"""optsel: optimizer-aware online data selection for LLM fine-tuning.

The code lives in four subpackages mapped from the repository's top-level folders:
``optsel.pipeline`` (data, training loop, engines), ``optsel.selection`` (the algorithm),
``optsel.launch`` (CLI, configs, launchers) and ``optsel.monitoring`` (Prometheus).
"""

__version__ = "0.1.0"
