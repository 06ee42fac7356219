"""Benchmarks printing ratios measured in one run; run as ``python -m bench.NAME``."""
