"""Benchmarks: each `python -m bench.NAME` ends with one JSON line of its figures."""
