"""Benchmarks of the processing plane, run by hand (`make bench`); see docs/performance.md."""
