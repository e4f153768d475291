"""Benchmarks for troupe: each suite measures a figure and its raw-library floor in the same run.

Run with ``python -m benchmarks [--quick] [--only SUITE ...] [--json PATH]`` from the repository
root, or ``make bench`` / ``make bench-quick``.
"""

__all__: list[str] = []
