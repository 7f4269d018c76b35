"""Built-in run and prepare configs and DeepSpeed JSONs, shipped as package data (``optsel.configs``).

Found through ``optsel.resources``; list them with ``optsel configs list``.
"""
