"""Benchmark scripts (``python -m benchmarks.bench_<name> [--quick]``); see README.md here."""
