"""Resources: where artifacts live, and the IO manager that stores every asset value there.

Environment variables are read here and nowhere else: `TINYPLM_HOME` (local root, default
`<project>/.tinyplm`) and, to store on S3, `TINYPLM_S3_BUCKET`, `TINYPLM_S3_PREFIX`,
`TINYPLM_S3_ENDPOINT_URL`, `TINYPLM_S3_REGION` (through `EnvVar`). Credentials are never part of
the configuration: boto3 finds them itself (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile,
an instance role). The IO manager stores directories, never pickles: an asset returns the path of
a finished staging directory and downstream assets receive the verified stored path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    EnvVar,
    InitResourceContext,
    InputContext,
    MetadataValue,
    OutputContext,
)
from dagster_aws.s3 import S3Resource
from pydantic import Field

from tinyplm_assets.metadata import manifest_digest
from tinyplm_lib.errors import StorageError
from tinyplm_lib.store.artifacts import ArtifactStore, LocalArtifactStore, StoredArtifact, artifact_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_home() -> str:
    return os.environ.get("TINYPLM_HOME", str(PROJECT_ROOT / ".tinyplm"))


# Settings that switch storage to S3, by the environment variable that fills each.
S3_SETTINGS_FROM_ENV = {
    "s3_bucket": "TINYPLM_S3_BUCKET",
    "s3_prefix": "TINYPLM_S3_PREFIX",
    "s3_endpoint_url": "TINYPLM_S3_ENDPOINT_URL",
    "s3_region": "TINYPLM_S3_REGION",
}


class ArtifactStorage(ConfigurableResource):
    """The artifact store: `<home>/artifacts/<asset key>/`, or S3 with that tree as its cache."""

    home: str = Field(default_factory=default_home, description="local root: artifacts (or S3 cache), downloads")
    verify_hashes: bool = Field(default=True, description="re-hash files on load; size checks alone when False")
    s3_bucket: Optional[str] = Field(default=None, description="store on S3 in this bucket; None = local")
    s3_prefix: str = Field(default="tinyplm", description="key prefix inside the bucket")
    s3_endpoint_url: Optional[str] = Field(default=None, description="S3-compatible endpoint (MinIO, …)")
    s3_region: Optional[str] = None
    s3_max_attempts: int = Field(default=5, description="attempts per S3 request before failing")

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Every asset uses this resource, so every step starts here: the whole run's config is
        # checked before the first step does any work (tinyplm_assets/preflight.py), instead of a
        # training setting failing after hours of preprocessing.
        if context.dagster_run is not None:
            from tinyplm_assets.preflight import check_run  # late: preflight imports config, config this

            check_run(context.dagster_run)

    def store(self) -> ArtifactStore:
        root = self._root()
        if not self.s3_bucket:
            return LocalArtifactStore(root, verify_hashes=self.verify_hashes)
        from tinyplm_lib.store.s3 import S3ArtifactStore

        return S3ArtifactStore(root, self.s3_client(), self.s3_bucket, self.s3_prefix,
                               verify_hashes=self.verify_hashes)

    def s3_client(self):
        """A boto3 S3 client from dagster-aws's S3Resource, with this resource's endpoint and region."""
        return S3Resource(endpoint_url=self.s3_endpoint_url, region_name=self.s3_region,
                          max_attempts=self.s3_max_attempts).get_client()

    def _root(self) -> Path:
        return Path(self.home) / "artifacts"

    def staging_dir(self, label: str) -> Path:
        """An empty directory on the store's filesystem, for an asset to write its value into."""
        # Staging is always local (under the same root for either store): no S3 client needed.
        return LocalArtifactStore(self._root()).staging_dir(label)

    def downloads_dir(self) -> Path:
        """Persistent partial downloads, kept across runs so an interrupted download resumes."""
        path = Path(self.home) / "downloads"
        path.mkdir(parents=True, exist_ok=True)
        return path


class ArtifactIOManager(ConfigurableIOManager):
    """Publishes asset directories atomically with a manifest; loads them verified."""

    storage: ArtifactStorage

    def handle_output(self, context: OutputContext, obj: Path) -> None:
        if not isinstance(obj, (str, Path)):
            raise StorageError(
                f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}; "
                "artifact assets must return the Path of the directory they wrote"
            )
        store = self.storage.store()
        stored = store.publish(_key(context), Path(obj))
        metadata = _metadata(stored)
        location = store.describe(_key(context))
        if location != str(stored.path):  # on S3, `path` is only this machine's cache
            metadata["stored_at"] = MetadataValue.path(location)
        context.add_output_metadata(metadata)

    def load_input(self, context: InputContext) -> Path:
        return self.storage.store().load(_key(context)).path


def _key(context: OutputContext | InputContext) -> str:
    partition = context.asset_partition_key if context.has_asset_partitions else None
    return artifact_key(context.asset_key.path, partition)


def _metadata(stored: StoredArtifact) -> dict:
    return {
        "path": MetadataValue.path(str(stored.path)),
        "files": stored.num_files,
        "bytes": stored.num_bytes,
        "manifest_sha256": manifest_digest(stored.manifest),
    }


def storage_from_env(resolve: bool = False) -> ArtifactStorage:
    """The storage resource as the environment sets it: S3 when TINYPLM_S3_BUCKET is set.

    In a code location the values stay `EnvVar`s (resolved per run, shown by name in the UI);
    `resolve=True` reads them now, for plain scripts such as `tinyplm_assets.locate`.
    """
    settings = {field: os.environ[var] if resolve else EnvVar(var)
                for field, var in S3_SETTINGS_FROM_ENV.items() if os.environ.get(var)}
    return ArtifactStorage(**settings)
