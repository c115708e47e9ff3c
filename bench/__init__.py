"""Benchmarks: each prints its figures beside the reference measured in the same run."""
