"""S3 artifact store against a real S3-compatible server (moto_server on loopback, over HTTP)."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from botocore.config import Config

from tinyplm_lib.errors import StorageError
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.s3 import S3ArtifactStore

from s3_server import ACCESS_KEY, SECRET_KEY, MotoServer, free_port

BUCKET = "tinyplm-store-test"


@pytest.fixture(scope="module")
def server():
    with MotoServer() as s3:
        s3.create_bucket(BUCKET)
        yield s3


@pytest.fixture
def store_factory(server, tmp_path, request):
    prefix = f"t/{request.node.name}"

    def make(cache="cache", client=None):
        return S3ArtifactStore(tmp_path / cache, client or server.client(), BUCKET, prefix)

    return make


class CountingClient:
    """Wraps a boto3 client: counts transfers, and can fail the Nth upload (a fault injected)."""

    def __init__(self, client, fail_upload_at: int | None = None) -> None:
        self._client, self.fail_upload_at = client, fail_upload_at
        self.uploads, self.downloads = 0, 0

    def upload_file(self, *args, **kwargs):
        self.uploads += 1
        if self.fail_upload_at is not None and self.uploads >= self.fail_upload_at:
            raise ConnectionResetError("injected: connection lost mid-upload")
        return self._client.upload_file(*args, **kwargs)

    def download_file(self, *args, **kwargs):
        self.downloads += 1
        return self._client.download_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def _staged(store, files: dict[str, bytes]):
    staging = store.staging_dir("t")
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    return staging


def _client(endpoint: str, key: str, secret: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def _objects(server, prefix=""):
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"]: client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            for page in pages for obj in page.get("Contents", [])}


def test_roundtrip_through_the_bucket_into_an_empty_cache(server, store_factory):
    writer = store_factory("writer")
    files = {"a.txt": "日本語のテキスト\n".encode(), "sub/b.bin": bytes(range(256)) * 4000}
    writer.publish("thing", _staged(writer, files))
    objects = _objects(server, writer.object_key("thing"))
    assert set(objects) == {writer.object_key("thing", n) for n in [*files, MANIFEST_FILE]}
    reader = store_factory("reader", CountingClient(server.client()))
    loaded = reader.load("thing")
    assert {p: (loaded.path / p).read_bytes() for p in files} == files
    assert reader.client.downloads == 2
    reader.load("thing")
    assert reader.client.downloads == 2, "a verified cache is not downloaded again"


def test_a_damaged_cache_file_is_downloaded_again(store_factory):
    store = store_factory()
    store.publish("thing", _staged(store, {"a.txt": b"right", "b.txt": b"also right"}))
    (store.path_for("thing") / "a.txt").write_bytes(b"wrong")
    counting = store_factory(client=CountingClient(store.client))
    assert (counting.load("thing").path / "a.txt").read_bytes() == b"right"
    assert counting.client.downloads == 1


def test_republish_leaves_only_the_new_version(server, store_factory):
    store = store_factory()
    store.publish("thing", _staged(store, {"old.txt": b"1", "both.txt": b"1"}))
    store.publish("thing", _staged(store, {"new.txt": b"2", "both.txt": b"2"}))
    keys = {k.rsplit("/", 1)[1] for k in _objects(server, store.object_key("thing"))}
    assert keys == {"new.txt", "both.txt", MANIFEST_FILE}
    fresh = store_factory("fresh").load("thing").path
    assert (fresh / "both.txt").read_bytes() == b"2" and not (fresh / "old.txt").exists()


def test_interrupted_upload_leaves_no_manifest_and_loads_refuse(server, store_factory):
    store = store_factory()
    store.publish("thing", _staged(store, {"a.txt": b"v1"}))
    broken = store_factory(client=CountingClient(store.client, fail_upload_at=2))
    with pytest.raises(ConnectionResetError):
        broken.publish("thing", _staged(broken, {"a.txt": b"v2", "b.txt": b"v2"}))
    assert store.object_key("thing", MANIFEST_FILE) not in _objects(server, store.object_key("thing"))
    assert not store.exists("thing")
    with pytest.raises(StorageError, match="never completely written") as err:
        store_factory("other").load("thing")
    assert f"s3://{BUCKET}/" in str(err.value)


def test_corrupted_object_is_detected_by_its_hash(server, store_factory):
    store = store_factory()
    store.publish("thing", _staged(store, {"a.txt": b"hello world"}))
    server.client().put_object(Bucket=BUCKET, Key=store.object_key("thing", "a.txt"), Body=b"hello WORLD")
    with pytest.raises(StorageError, match="does not match its manifest"):
        store_factory("fresh").load("thing")


def test_keys_and_delete(server, store_factory):
    store = store_factory()
    for step in (10, 20):
        store.publish(f"ckpt/stage/step-{step}", _staged(store, {"w": bytes([step])}))
    store.client.put_object(Bucket=BUCKET, Key=store.object_key("ckpt/stage/step-30", "w"), Body=b"x")
    assert store.keys("ckpt/stage") == ["ckpt/stage/step-10", "ckpt/stage/step-20"]
    store.delete("ckpt/stage/step-10")
    assert store.keys("ckpt/stage") == ["ckpt/stage/step-20"]
    assert not store.path_for("ckpt/stage/step-10").exists()


def test_unreachable_endpoint_fails_clearly_after_bounded_retries(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          config=Config(retries={"max_attempts": 3, "mode": "standard"}))
    store = S3ArtifactStore(tmp_path, client, BUCKET)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.load("thing")
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert endpoint in message and f"s3://{BUCKET}/tinyplm/thing" in message
    assert ACCESS_KEY not in message and SECRET_KEY not in message


@pytest.fixture(scope="module")
def checking_server():
    """A server of its own that checks signatures (`server` accepts any keys), holding BUCKET; its valid keys."""
    with MotoServer() as s3:
        s3.create_bucket(BUCKET)
        yield s3, s3.enforce_auth()


@pytest.mark.parametrize("wrong", ["access_key", "secret"])
def test_bad_credentials_are_refused_and_not_echoed(checking_server, tmp_path, wrong):
    server, (key, secret) = checking_server
    good = S3ArtifactStore(tmp_path / "good", _client(server.endpoint, key, secret), BUCKET, f"creds-{wrong}")
    good.publish("thing", _staged(good, {"a": b"1"}))  # the bucket exists and the right keys work
    bad_key, bad_secret = ("AKIATINYPLMWRONGKEY1", secret) if wrong == "access_key" else (key, "tinyplm-wrong-Xy7")
    bad = S3ArtifactStore(tmp_path / "bad", _client(server.endpoint, bad_key, bad_secret), BUCKET, f"creds-{wrong}")
    with pytest.raises(StorageError) as err:
        bad.publish("thing", _staged(bad, {"a": b"2"}))
    message = str(err.value)
    code = "InvalidAccessKeyId" if wrong == "access_key" else "SignatureDoesNotMatch"
    assert code in message, f"refused for another reason than the credentials: {message}"
    assert f"s3://{BUCKET}/creds-{wrong}/thing" in message and server.endpoint in message
    for secret_text in {bad_key, bad_secret, key, secret, ACCESS_KEY, SECRET_KEY}:
        assert secret_text not in message
    assert (good.load("thing").path / "a").read_bytes() == b"1", "the refused publish changed nothing"


def test_bucket_holds_raw_files_and_json_manifests_only(server, store_factory):
    store = store_factory()
    store.publish("thing", _staged(store, {"a.txt": b"text", "w.safetensors": b"\x08\x00" * 10}))
    objects = _objects(server, store.object_key("thing"))
    manifest = json.loads(objects[store.object_key("thing", MANIFEST_FILE)])
    listed = {store.object_key("thing", f["path"]) for f in manifest["files"]}
    assert set(objects) == listed | {store.object_key("thing", MANIFEST_FILE)}
    assert not any(data.startswith(b"\x80") for data in objects.values()), "pickle protocol header"
