"""Benchmarks (``unmerge bench ...``): side-by-side figures from one run, each job in its own process."""
