"""optsel: optimizer-aware online data selection for LLM fine-tuning.

The code lives in four subpackages mapped from the repository's top-level folders:
``optsel.pipeline`` (data, training loop, engines), ``optsel.selection`` (the algorithm),
``optsel.launch`` (CLI, launchers) and ``optsel.monitoring`` (Prometheus). The core modules here
(``distributed``, ``config_loader``, ``resources``) import none of them; imports run launch → pipeline →
selection → core (``scripts/import_graph.py --check``).
"""

__version__ = "0.1.0"
