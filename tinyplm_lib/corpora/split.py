"""The train/validation split rule: a seeded hash of a stable key, the same on every machine and run.

cc100 keys documents by their index in the file ("doc:<index>"), JaWiki articles by page id
("page:<page_id>"), so a document never straddles the splits and re-runs pick the same ones.
"""

from __future__ import annotations

import hashlib


def in_validation(seed: int, key: str, fraction: float) -> bool:
    """True for about `fraction` of keys; fixed for a (seed, key) pair on every machine and run.

    blake2b rather than Python's hash(), which is salted per process.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64
