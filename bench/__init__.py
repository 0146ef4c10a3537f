"""Benchmarks of PRODUCT.md §8: `python -m bench.run` (what `make bench` calls)."""
