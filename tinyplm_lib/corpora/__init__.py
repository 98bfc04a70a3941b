"""Corpora: raw files to cleaned, sentence-per-line train/validation splits.

The streaming line reader, the cleaning rules, exact deduplication, and the cc100 and JaWiki
builders, each deterministic from a seed and byte-identical for any worker count.
"""
