"""fusenn's benchmark and validation runner: `python -m benchmarks` (see __main__.py)."""
