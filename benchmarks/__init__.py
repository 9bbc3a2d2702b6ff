"""Benchmarks: ``python -m benchmarks.<name>``; results in ``bench/``. Nothing imports this package."""
