"""Print the stored, verified folder of an asset: `python -m tinyplm_assets.locate bert_stage2_jawiki`.

Reads the same storage settings as the code location (`TINYPLM_HOME`, `TINYPLM_S3_*`); exits non-zero with the
reason when the artifact is missing or fails its manifest check.
"""

from __future__ import annotations

import sys

from tinyplm_assets.resources import storage_from_env
from tinyplm_lib.errors import StorageError
from tinyplm_lib.store.artifacts import artifact_key


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tinyplm_assets.locate ASSET_NAME", file=sys.stderr)
        return 2
    try:
        stored = storage_from_env(resolve=True).store().load(artifact_key(argv[0].split("/")))
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(stored.path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
