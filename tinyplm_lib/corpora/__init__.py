"""Corpora: raw files to cleaned, sentence-per-line train/validation splits.

`reader` (the streaming line reader), `records` (counts, bad-record policy), `cleaning`, `dedup`,
`split`, and the builders `cc100` and `jawiki` (its worker side in `jawiki_parse`), each
deterministic from a seed and byte-identical for any worker count.
"""
