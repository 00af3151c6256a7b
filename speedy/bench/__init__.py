"""`speedy bench`: the benchmark, its load generator and the no-storage sink."""
