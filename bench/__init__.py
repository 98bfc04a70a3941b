"""Benchmarks of tinyplm against the original pipeline; each module's docstring gives its command."""
