"""Artifacts in an S3 bucket (AWS, MinIO, any S3-compatible endpoint), with a verified local cache.

Publishing deletes the old manifest first, uploads every file, writes the manifest last, then drops
files only the old version had: no manifest, no artifact. Those are many requests, so two runs never
publish one key at once: each holds the key's lease (`lock`, tinyplm_lib/store/locks.py). Reads fetch
only missing or differing files, verify sizes and sha256, and install atomically. Objects are raw
files and JSON, never pickles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from tinyplm_lib import faultpoints
from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import StorageError
from tinyplm_lib.files import sha256_file
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.artifacts import MANIFEST_FORMAT, ArtifactStore, StoredArtifact, write_manifest
from tinyplm_lib.store.locks import LEASE_TTL_S, S3Lease
from tinyplm_lib.store.scratch import release_scratch_dir

# Multipart above 64 MiB, in 64 MiB parts, 4 parts in flight: a 15 GB raw dump is ~230 parts.
TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3ArtifactStore(ArtifactStore):
    """`s3://<bucket>/<prefix>/<artifact_key>/…`, cached under `<cache_root>/<artifact_key>/`."""

    def __init__(self, cache_root: Path, client, bucket: str, prefix: str = "tinyplm", *,
                 verify_hashes: bool = True, transfer: TransferConfig = TRANSFER) -> None:
        super().__init__(cache_root, verify_hashes=verify_hashes)
        if not bucket:
            raise StorageError("S3 storage needs a bucket name")
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.transfer = transfer
        self.endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "default AWS endpoint"
        self.lease_ttl_s = LEASE_TTL_S

    def object_key(self, key: str, relative: str = "") -> str:
        return "/".join(part for part in (self.prefix, key, relative) if part)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def lock(self, key: str, run_id: str) -> S3Lease:
        """A lease object in the bucket (`<prefix>/.locks/<key>.json`): runs on every machine see it."""
        return S3Lease(self, key, run_id, self.lease_ttl_s)

    # -- write ---------------------------------------------------------------------------------
    def _commit(self, key: str, incoming: Path, manifest: dict) -> None:
        old = self._remote_manifest(key)
        manifest_key = self.object_key(key, MANIFEST_FILE)
        with self._errors("replace", key):
            self.client.delete_object(Bucket=self.bucket, Key=manifest_key)
            for done, entry in enumerate(manifest["files"]):
                if done == len(manifest["files"]) // 2:
                    faultpoints.reached("publish", key)  # old manifest gone, half the files uploaded
                self.client.upload_file(str(incoming / entry["path"]), self.bucket,
                                        self.object_key(key, entry["path"]), Config=self.transfer)
            body = (incoming / MANIFEST_FILE).read_bytes()
            self.client.put_object(Bucket=self.bucket, Key=manifest_key, Body=body,
                                   ContentType="application/json")
            if old is not None:
                kept = {entry["path"] for entry in manifest["files"]}
                for entry in old["files"]:
                    if entry["path"] not in kept:
                        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key, entry["path"]))

    # -- read ----------------------------------------------------------------------------------
    def load(self, key: str) -> StoredArtifact:
        manifest = self._remote_manifest(key)
        if manifest is None:
            raise StorageError(
                f"{self.describe(key)} has no {MANIFEST_FILE}: the artifact was never completely "
                "written (an interrupted upload, or never materialised); re-materialise it"
            )
        cached = self.path_for(key)
        incoming = self._new_incoming()
        try:
            for entry in manifest["files"]:
                target = incoming / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                local = cached / entry["path"]
                if local.is_file() and local.stat().st_size == entry["size"] and sha256_file(local) == entry["sha256"]:
                    os.link(local, target)  # the cached copy is still right: no download
                    continue
                with self._errors("download", key), disk_errors(
                        cached, lambda: _space_to_cache(manifest), f"a local copy of {self.describe(key)}",
                        cleanup=lambda: shutil.rmtree(incoming, ignore_errors=True)):
                    self.client.download_file(self.bucket, self.object_key(key, entry["path"]), str(target),
                                              Config=self.transfer)
                size = target.stat().st_size
                if size != entry["size"] or sha256_file(target) != entry["sha256"]:
                    raise StorageError(
                        f"{self.describe(key)}/{entry['path']}: the object ({size} bytes) does not match "
                        "its manifest's size/sha256 — corrupted or overwritten in the bucket; re-materialise it"
                    )
            write_manifest(incoming, manifest)
            return StoredArtifact(self._install(key, incoming), manifest)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
            release_scratch_dir(incoming)

    def exists(self, key: str) -> bool:
        return self._remote_manifest(key) is not None

    def keys(self, prefix: str) -> list[str]:
        base = self.object_key(prefix) + "/"
        found = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/" + MANIFEST_FILE):
                        found.append(f"{prefix}/{obj['Key'][len(base):-len(MANIFEST_FILE) - 1]}")
        return sorted(found)

    def delete(self, key: str) -> None:
        manifest = self._remote_manifest(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key, MANIFEST_FILE))
            for entry in (manifest or {"files": []})["files"]:
                self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key, entry["path"]))
        super().delete(key)

    # -- helpers -------------------------------------------------------------------------------
    def _remote_manifest(self, key: str) -> dict | None:
        try:
            with self._errors("read manifest of", key, missing_ok=True):
                body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key, MANIFEST_FILE))["Body"].read()
        except _Missing:
            return None
        try:
            manifest = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.describe(key)}/{MANIFEST_FILE}: unreadable manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
                manifest.get("files"), list):
            raise StorageError(f"{self.describe(key)}/{MANIFEST_FILE}: unknown manifest format")
        for entry in manifest["files"]:
            path = entry.get("path", "")
            if path.startswith("/") or ".." in path.split("/"):
                raise StorageError(f"{self.describe(key)}/{MANIFEST_FILE}: unsafe path {path!r}")
        return manifest

    def _errors(self, action: str, key: str, missing_ok: bool = False):
        return _S3Errors(self, action, key, missing_ok)


class _Missing(Exception):
    pass


class _S3Errors:
    """Turns botocore failures into StorageErrors that name the object and endpoint, not secrets."""

    def __init__(self, store: S3ArtifactStore, action: str, key: str, missing_ok: bool) -> None:
        self.store, self.action, self.key, self.missing_ok = store, action, key, missing_ok

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        # boto3's managed upload wraps a refused request (AccessDenied, ...) in S3UploadFailedError.
        if exc is None or not isinstance(exc, (BotoCoreError, ClientError, S3UploadFailedError)):
            return False
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
        if self.missing_ok and code in _MISSING:
            raise _Missing() from None
        raise StorageError(
            f"S3 {self.action} {self.store.describe(self.key)} failed at {self.store.endpoint}: "
            f"{type(exc).__name__}: {_scrub(str(exc), self.store.client)}"
        ) from None


def _space_to_cache(manifest: dict) -> SpaceNeeded:
    """What a load writes to the cache, for a DiskFullError: every file of the artifact, at most
    (files the cache still holds unchanged are linked, not downloaded)."""
    return SpaceNeeded(sum(entry["size"] for entry in manifest["files"]),
                       f"the {len(manifest['files'])} files its manifest lists, less any still cached")


def _scrub(message: str, client) -> str:
    """Remove the client's access key and secret from a message, should a server echo them."""
    try:
        credentials = client._request_signer._credentials  # botocore keeps them here
        secrets = [credentials.access_key, credentials.secret_key, credentials.token]
    except AttributeError:
        secrets = []
    # Longest first; very short values (test keys such as "a") would blank ordinary letters.
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message
