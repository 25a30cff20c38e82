"""Benchmarks: gprocpool side by side with the pools people already use.

Run ``python -m benchmarks`` (a few minutes), ``python -m benchmarks --quick`` (under a
minute) or ``python -m benchmarks --help``.  See :mod:`benchmarks.run` for the layout.
"""
