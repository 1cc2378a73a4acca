"""matplotlib figures made from benchmarks/results/*.csv alone."""
