"""The demo graph stored on S3 (moto_server over HTTP), then re-materialised on a "fresh machine".

Real `dagster` processes throughout. conftest's `demo_run` materialises the whole graph with the CLI
into the bucket, which these tests only read. A new DAGSTER_HOME with an empty local cache
re-materialises `bert_stage2_jawiki` from a copy of that bucket, which can only succeed by loading
its inputs from there; another copy, with an upstream manifest deleted, must be refused. Each run is
a module fixture on a bucket of its own, so the tests pass in any order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from demo_instance import (
    ASSET_STEPS,
    BUCKET,
    CHECK_STEPS,
    PREFIX,
    copy_bucket,
    machine_env,
    run_dagster,
    succeeded_steps,
)
from s3_server import ACCESS_KEY, SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

FAST = REPO_ROOT / "tests" / "configs" / "fast-training.yaml"
STAGE2_ALONE = ["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
                "-c", "configs/demo.yaml", "-c", str(FAST)]
FRESH_BUCKET, INCOMPLETE_BUCKET = "tinyplm-e2e-fresh", "tinyplm-e2e-incomplete"


@pytest.fixture(scope="module")
def s3_run(demo_run, demo_s3, tmp_path_factory):
    """The demo machine, its server and a folder for more machines."""
    return {"server": demo_s3, "tmp": tmp_path_factory.mktemp("s3"), "demo": demo_run}


@pytest.fixture(scope="module")
def fresh_machine(s3_run):
    """Stage 2 re-materialised by a new machine from a copy of the demo bucket: its env, the bucket before/after."""
    server = s3_run["server"]
    copy_bucket(server, FRESH_BUCKET)
    env = machine_env(s3_run["tmp"] / "gpu-box", server, FRESH_BUCKET)
    before = _bucket(server, FRESH_BUCKET)
    output = run_dagster(STAGE2_ALONE, env)
    return {"env": env, "before": before, "after": _bucket(server, FRESH_BUCKET), "output": output}


@pytest.fixture(scope="module")
def incomplete_upstream(s3_run):
    """The output of stage 2 run from a copy of the bucket whose jawiki_tokens lost its manifest (it fails)."""
    server = s3_run["server"]
    copy_bucket(server, INCOMPLETE_BUCKET)
    server.client().delete_object(Bucket=INCOMPLETE_BUCKET, Key=f"{PREFIX}/jawiki_tokens/_manifest.json")
    return run_dagster(STAGE2_ALONE, machine_env(s3_run["tmp"] / "third-box", server, INCOMPLETE_BUCKET), ok=False)


def _bucket(server: MotoServer, bucket: str = BUCKET) -> dict[str, bytes]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_whole_graph_lands_in_the_bucket(s3_run):
    assert succeeded_steps(s3_run["demo"].dagster_home) == ASSET_STEPS | CHECK_STEPS
    manifests = {k for k in _bucket(s3_run["server"]) if k.endswith("/_manifest.json")}
    assert {k.split("/")[2] for k in manifests} >= {
        "cc100_ja_raw", "jawiki_raw", "cc100_ja_train", "cc100_ja_validation", "jawiki_train",
        "jawiki_validation", "tokenizer_sample", "wordpiece_tokenizer", "cc100_ja_tokens",
        "jawiki_tokens", "bert_stage1_cc100", "bert_stage2_jawiki"}
    assert all(k.startswith(f"{PREFIX}/") for k in manifests)


def test_fresh_machine_rematerialises_stage2_from_the_bucket(fresh_machine):
    env, before, after = fresh_machine["env"], fresh_machine["before"], fresh_machine["after"]
    assert succeeded_steps(env["DAGSTER_HOME"]) == {"bert_stage2_jawiki", "bert_stage2_jawiki_loss_checks"}
    changed = {k.split("/")[2] for k in after if before.get(k) != after[k]}
    assert changed == {"bert_stage2_jawiki"}, "only stage 2 is rewritten; its inputs came from the bucket"
    cache = Path(env["TINYPLM_HOME"]) / "artifacts"
    assert (cache / "jawiki_tokens" / "_manifest.json").is_file(), "inputs were downloaded into the cache"
    assert not (cache / "cc100_ja_raw").exists(), "nothing the asset does not need is fetched"


def test_bucket_holds_no_pickles(s3_run):
    objects = _bucket(s3_run["server"])
    listed = set()
    for key, data in objects.items():
        if key.endswith("/_manifest.json"):
            base = key[: -len("_manifest.json")]
            listed |= {base + f["path"] for f in json.loads(data)["files"]}
    assert set(objects) - listed == {k for k in objects if k.endswith("/_manifest.json")}
    assert not [k for k in objects if k.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    assert not [k for k, data in objects.items() if data[:1] == b"\x80"], "pickle protocol header"


def test_incomplete_upstream_is_refused_with_a_clear_error(incomplete_upstream):
    assert f"s3://{INCOMPLETE_BUCKET}/{PREFIX}/jawiki_tokens has no _manifest.json" in incomplete_upstream


def test_credentials_never_appear_in_logs_metadata_or_errors(s3_run, fresh_machine, incomplete_upstream):
    texts = [s3_run["demo"].output, fresh_machine["output"], incomplete_upstream]
    homes = [s3_run["demo"].dagster_home, *s3_run["tmp"].glob("*/dagster_home")]
    assert len(homes) == 3, homes
    for home in homes:
        for path in home.rglob("*"):
            if path.is_file():
                texts.append(path.read_bytes().decode("utf-8", "replace"))
    for bucket in (BUCKET, FRESH_BUCKET, INCOMPLETE_BUCKET):
        for key, data in _bucket(s3_run["server"], bucket).items():
            if key.endswith((".json", ".txt")):
                texts.append(data.decode("utf-8", "replace"))
    assert len(texts) > 5
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
