"""The demo graph stored on S3 (moto_server over HTTP), then re-materialised on a "fresh machine".

Real `dagster` processes throughout. conftest's `demo_run` materialises the whole graph with the CLI
into the bucket; here a new DAGSTER_HOME with an empty local cache re-materialises
`bert_stage2_jawiki`, which can only succeed by loading its inputs from the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from demo_instance import ASSET_STEPS, BUCKET, CHECK_STEPS, PREFIX, machine_env, run_dagster, succeeded_steps
from s3_server import ACCESS_KEY, SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

FAST = REPO_ROOT / "tests" / "configs" / "fast-training.yaml"
STAGE2_ALONE = ["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
                "-c", "configs/demo.yaml", "-c", str(FAST)]


@pytest.fixture(scope="module")
def s3_run(demo_run, demo_s3, tmp_path_factory):
    """The demo machine's bucket, a folder for more machines, and every CLI output so far."""
    return {"server": demo_s3, "tmp": tmp_path_factory.mktemp("s3"), "demo": demo_run, "outputs": [demo_run.output]}


def _bucket(server: MotoServer) -> dict[str, bytes]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_whole_graph_lands_in_the_bucket(s3_run):
    assert succeeded_steps(s3_run["demo"].dagster_home) == ASSET_STEPS | CHECK_STEPS
    manifests = {k for k in _bucket(s3_run["server"]) if k.endswith("/_manifest.json")}
    assert {k.split("/")[2] for k in manifests} >= {
        "cc100_ja_raw", "jawiki_raw", "cc100_ja_train", "cc100_ja_validation", "jawiki_train",
        "jawiki_validation", "tokenizer_sample", "wordpiece_tokenizer", "cc100_ja_tokens",
        "jawiki_tokens", "bert_stage1_cc100", "bert_stage2_jawiki"}
    assert all(k.startswith(f"{PREFIX}/") for k in manifests)


def test_fresh_machine_rematerialises_stage2_from_the_bucket(s3_run):
    env = machine_env(s3_run["tmp"] / "gpu-box", s3_run["server"])
    before = _bucket(s3_run["server"])
    output = run_dagster(STAGE2_ALONE, env)
    assert succeeded_steps(env["DAGSTER_HOME"]) == {"bert_stage2_jawiki", "bert_stage2_jawiki_loss_checks"}
    after = _bucket(s3_run["server"])
    changed = {k.split("/")[2] for k in after if before.get(k) != after[k]}
    assert changed == {"bert_stage2_jawiki"}, "only stage 2 is rewritten; its inputs came from the bucket"
    cache = Path(env["TINYPLM_HOME"]) / "artifacts"
    assert (cache / "jawiki_tokens" / "_manifest.json").is_file(), "inputs were downloaded into the cache"
    assert not (cache / "cc100_ja_raw").exists(), "nothing the asset does not need is fetched"
    s3_run["outputs"].append(output)


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


def test_incomplete_upstream_is_refused_with_a_clear_error(s3_run):
    client, key = s3_run["server"].client(), f"{PREFIX}/jawiki_tokens/_manifest.json"
    manifest = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.delete_object(Bucket=BUCKET, Key=key)
    try:
        output = run_dagster(STAGE2_ALONE, machine_env(s3_run["tmp"] / "third-box", s3_run["server"]), ok=False)
    finally:  # the bucket is the session's: whole again for whoever reads it next
        client.put_object(Bucket=BUCKET, Key=key, Body=manifest)
    assert f"s3://{BUCKET}/{PREFIX}/jawiki_tokens has no _manifest.json" in output
    s3_run["outputs"].append(output)


def test_credentials_never_appear_in_logs_metadata_or_errors(s3_run):
    texts = list(s3_run["outputs"])
    for home in [s3_run["demo"].dagster_home, *s3_run["tmp"].glob("*/dagster_home")]:
        for path in home.rglob("*"):
            if path.is_file():
                texts.append(path.read_bytes().decode("utf-8", "replace"))
    for key, data in _bucket(s3_run["server"]).items():
        if key.endswith((".json", ".txt")):
            texts.append(data.decode("utf-8", "replace"))
    assert len(texts) > 5
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
