"""Benchmark sweeps; each writes long-format CSV rows under benchmarks/results/."""
