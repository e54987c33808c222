"""Benchmarks for pgflow_py (not part of the test suite): ``python -m benchmarks``."""
