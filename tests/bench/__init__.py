"""Tests of the benchmarks in bench/ (they must keep running)."""
