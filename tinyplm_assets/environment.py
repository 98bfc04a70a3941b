"""The project root and the storage environment, read here and nowhere else.

`TINYPLM_HOME` (local root, default `<project>/.tinyplm`) and, to store on S3, `TINYPLM_S3_BUCKET`,
`TINYPLM_S3_PREFIX`, `TINYPLM_S3_ENDPOINT_URL`, `TINYPLM_S3_REGION`. Importing this module reads
nothing: the functions read the environment when called. It imports no other tinyplm_assets module.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import EnvVar

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Settings that switch storage to S3, by the environment variable that fills each.
S3_SETTINGS_FROM_ENV = {
    "s3_bucket": "TINYPLM_S3_BUCKET",
    "s3_prefix": "TINYPLM_S3_PREFIX",
    "s3_endpoint_url": "TINYPLM_S3_ENDPOINT_URL",
    "s3_region": "TINYPLM_S3_REGION",
}


def default_home() -> str:
    return os.environ.get("TINYPLM_HOME", str(PROJECT_ROOT / ".tinyplm"))


def s3_settings(resolve: bool = False) -> dict:
    """The storage resource fields the environment sets ({} when none of its variables is set).

    In a code location the values stay `EnvVar`s (resolved per run, shown by name in the UI);
    `resolve=True` reads them now, for plain scripts such as `tinyplm_assets.locate`.
    """
    return {field: os.environ[var] if resolve else EnvVar(var)
            for field, var in S3_SETTINGS_FROM_ENV.items() if os.environ.get(var)}
