"""Benchmarks: each compares side by side in one run and prints ratios (see BENCHMARKS.md)."""
