"""Benchmarks, each a script run from the repository (`python benchmarks/NAME.py`)."""
