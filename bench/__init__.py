"""Benchmarks of tinyplm against the original pipeline, and the fault-injection bench.

Each runnable module's docstring gives its command; bench/README.md explains them and their results.
"""
