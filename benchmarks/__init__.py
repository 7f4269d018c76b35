"""Benchmarks: quality (benchmarks/quality.py) and speed (benchmarks/speed.py); see README.md."""
