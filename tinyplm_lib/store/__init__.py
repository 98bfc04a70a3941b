"""Store: where artifacts live, locally or on S3, each a directory published atomically with a manifest.

Scratch directories are locked by their writer so a dead run's leftovers are swept, never reused.
"""
