"""Benchmark scripts (`python -m bench.<name>`); results, tables and plots go to docs/."""
