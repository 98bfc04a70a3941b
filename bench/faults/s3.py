"""S3 scenarios of `python -m bench.faults`: an object overwritten, a publish killed, the network cut.

Against a real moto_server (tests/s3_server.py) and, for the cut, a TCP proxy in front of it: a load
is refused naming the s3:// object or its manifest, nothing half-uploaded is cached, a re-publish heals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.faults.children import kill_when, run_child, start_child
from bench.faults.core import Run, scenario
from bench.faults.lab import Lab, seeded_files
from bench.faults.proxy import CuttableProxy
from tinyplm_lib import faultpoints
from tinyplm_lib.errors import StorageError
from tinyplm_lib.layout import MANIFEST_FILE

BUCKET = "tinyplm-faults"


def _s3_store(lab: Lab, cache: Path, client=None, prefix: str = "faults"):
    from tinyplm_lib.store.s3 import S3ArtifactStore

    server = lab.moto()
    lab.cached("bucket", lambda: server.create_bucket(BUCKET) or BUCKET)
    return S3ArtifactStore(cache, client or server.client(), BUCKET, prefix)


@scenario("s3")
def s3_object_corrupted(lab: Lab, run: Run) -> None:
    """An object overwritten in the bucket: the load is refused naming the s3:// object; nothing installed."""
    work = lab.dir("s3-corrupt")
    writer = _s3_store(lab, work / "writer", prefix="corrupt")
    source = seeded_files(work / "v1", 3, 64 * 1024, seed=4)
    good = writer.publish("thing", source).manifest
    key = writer.object_key("thing", "part-002.bin")
    data = bytearray(writer.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[77] ^= 0x80
    writer.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    reader = _s3_store(lab, work / "reader", prefix="corrupt")
    run.raises(StorageError, lambda: reader.load("thing"), f"s3://{BUCKET}/{key}", "does not match")
    run.check(not reader.path_for("thing").exists(), "the corrupted copy was installed in the cache")
    writer.publish("thing", source)
    run.artifact(reader.load("thing").manifest == good, "the re-published artifact differs")


@scenario("s3")
def s3_publish_killed(lab: Lab, run: Run) -> None:
    """SIGKILL mid-upload to S3: no manifest, so the artifact is refused by name; a re-run republishes."""
    work = lab.dir("s3-killed")
    server = lab.moto()
    writer = _s3_store(lab, work / "writer", prefix="killed")
    writer.publish("thing", seeded_files(work / "v1", 2, 4096, seed=5, stem="old"))
    new_source = seeded_files(work / "v2", 40, 128 * 1024, seed=6, stem="new")
    args = {"endpoint": server.endpoint, "bucket": BUCKET, "key": "thing", "source": str(new_source)}
    new_manifest, seconds = run_child("s3_publish", work / "reference.log", ready=_uploading(writer, "ref"),
                                      env=server.env(), cache=str(work / "reference"), prefix="ref", **args)
    # Paused by tinyplm_lib/faultpoints.py after the old manifest is deleted and 20 of 40 files uploaded.
    faults = work / "faults"
    faults.mkdir()
    process = start_child("s3_publish", work / "child.log", cache=str(work / "child"), prefix="killed",
                          env={**server.env(), faultpoints.DIR_ENV: str(faults), faultpoints.PAUSE_ENV: "publish:thing"},
                          **args)
    run.require(kill_when(process, (faults / faultpoints.PAUSED_FILE).exists, 0.0), "the upload ended before the kill")
    uploaded = [key for key in _keys(writer, "killed/thing/") if "/new-" in key]
    reader = _s3_store(lab, work / "reader", prefix="killed")
    run.raises(StorageError, lambda: reader.load("thing"), f"s3://{BUCKET}/killed/thing", MANIFEST_FILE)
    run.check(not reader.path_for("thing").exists(), "a half-uploaded artifact reached the reader's cache")
    writer.publish("thing", new_source)
    run.artifact(reader.load("thing").manifest == new_manifest, "the re-published artifact differs")
    run.note(f"40 uploads take {seconds:.2f} s; killed with {len(uploaded)} of the new files uploaded and the old "
             "manifest deleted: refused by name; then republished identically")


def _keys(store, prefix: str) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _uploading(store, prefix: str) -> Callable[[], bool]:
    """True once the first object of the new version is in the bucket (polled at most every 20 ms)."""
    key = f"{prefix}/thing/new-000.bin"
    last = [0.0]

    def ready() -> bool:
        if time.monotonic() - last[0] < 0.02:
            return False
        last[0] = time.monotonic()
        try:
            store.client.head_object(Bucket=BUCKET, Key=key)
            return True
        except Exception:  # noqa: BLE001 - 404 until the upload reaches it
            return False
    return ready


@scenario("s3")
def s3_connections_cut_mid_upload(lab: Lab, run: Run) -> None:
    """The S3 endpoint's connections are cut mid-upload: StorageError naming the object; a retry heals."""
    import boto3
    from botocore.config import Config

    work = lab.dir("s3-cut")
    server = lab.moto()
    proxy = CuttableProxy(server.port)
    try:
        config = Config(retries={"total_max_attempts": 2}, connect_timeout=2, read_timeout=5)
        client = boto3.client("s3", endpoint_url=proxy.endpoint, config=config, **_credentials(server))
        store = _s3_store(lab, work / "cache", client=client, prefix="cut")
        store.publish("thing", seeded_files(work / "v1", 2, 4096, seed=7))
        source = seeded_files(work / "v2", 6, 64 * 1024, seed=8)
        uploads = []
        upload_file = client.upload_file

        def cutting_upload(*args, **kwargs):
            uploads.append(args[2])
            if len(uploads) == 3:
                proxy.cut()  # the network goes away under the third upload
            return upload_file(*args, **kwargs)

        client.upload_file = cutting_upload
        run.raises(StorageError, lambda: store.publish("thing", source), f"s3://{BUCKET}/cut/thing", proxy.endpoint)
        proxy.restore()
        reader = _s3_store(lab, work / "reader", prefix="cut")
        run.raises(StorageError, lambda: reader.load("thing"), MANIFEST_FILE)
        client.upload_file = upload_file
        manifest = store.publish("thing", source).manifest
        run.artifact(reader.load("thing").manifest == manifest, "the re-published artifact differs")
        left = list((store.root / ".incoming").glob("*"))
        run.check(left == [], f"the failed publish left {left}")
    finally:
        proxy.close()


def _credentials(server) -> dict:
    env = server.env()
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}
