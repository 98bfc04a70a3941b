"""The demo graph stored on S3 (moto_server over HTTP), then re-materialised on a "fresh machine".

Real `dagster` processes throughout. The second half uses a new DAGSTER_HOME and an empty local
cache, so `bert_stage2_jawiki` can only succeed by loading its inputs from the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import CHECK_STEPS, _succeeded_steps

from conftest import REPO_ROOT
from s3_server import ACCESS_KEY, SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

DAGSTER = str(Path(sys.executable).with_name("dagster"))
BUCKET = "tinyplm-e2e"
FAST = REPO_ROOT / "tests" / "configs" / "fast-training.yaml"


def _machine(tmp: Path, server: MotoServer) -> dict:
    """Environment of one 'machine': its own Dagster instance and local cache, the shared bucket."""
    (tmp / "dagster_home").mkdir(parents=True)
    (tmp / "dagster_home" / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TINYPLM_"))}
    env.update(server.env(), TINYPLM_HOME=str(tmp / "home"), DAGSTER_HOME=str(tmp / "dagster_home"),
               TINYPLM_S3_BUCKET=BUCKET, TINYPLM_S3_ENDPOINT_URL=server.endpoint,
               TINYPLM_S3_PREFIX="runs/e2e", HF_HUB_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    return env


def _run(args: list[str], env: dict, ok: bool = True) -> str:
    result = subprocess.run([DAGSTER, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, output[-5000:]
    return output


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory):
    with MotoServer() as server:
        server.create_bucket(BUCKET)
        tmp = tmp_path_factory.mktemp("s3")
        env = _machine(tmp / "cpu-box", server)
        output = _run(["job", "execute", "-m", "tinyplm_assets.definitions", "-j", "pretrain_all",
                       "-c", "configs/demo.yaml", "-c", str(FAST)], env)
        yield {"server": server, "tmp": tmp, "output": output, "env": env}


def _bucket(server: MotoServer) -> dict[str, bytes]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_whole_graph_lands_in_the_bucket(s3_run):
    assert len(_succeeded_steps(s3_run["env"]["DAGSTER_HOME"])) == 10 + len(CHECK_STEPS)
    manifests = {k for k in _bucket(s3_run["server"]) if k.endswith("/_manifest.json")}
    assert {k.split("/")[2] for k in manifests} >= {
        "cc100_ja_raw", "jawiki_raw", "cc100_ja_train", "cc100_ja_validation", "jawiki_train",
        "jawiki_validation", "tokenizer_sample", "wordpiece_tokenizer", "cc100_ja_tokens",
        "jawiki_tokens", "bert_stage1_cc100", "bert_stage2_jawiki"}
    assert all(k.startswith("runs/e2e/") for k in manifests)


def test_fresh_machine_rematerialises_stage2_from_the_bucket(s3_run):
    env = _machine(s3_run["tmp"] / "gpu-box", s3_run["server"])
    before = _bucket(s3_run["server"])
    output = _run(["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
                   "-c", "configs/demo.yaml", "-c", str(FAST)], env)
    assert _succeeded_steps(env["DAGSTER_HOME"]) == {"bert_stage2_jawiki", "bert_stage2_jawiki_loss_checks"}
    after = _bucket(s3_run["server"])
    changed = {k.split("/")[2] for k in after if before.get(k) != after[k]}
    assert changed == {"bert_stage2_jawiki"}, "only stage 2 is rewritten; its inputs came from the bucket"
    cache = Path(env["TINYPLM_HOME"]) / "artifacts"
    assert (cache / "jawiki_tokens" / "_manifest.json").is_file(), "inputs were downloaded into the cache"
    assert not (cache / "cc100_ja_raw").exists(), "nothing the asset does not need is fetched"
    s3_run["outputs"] = [s3_run["output"], output]


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
    server = s3_run["server"]
    server.client().delete_object(Bucket=BUCKET, Key="runs/e2e/jawiki_tokens/_manifest.json")
    env = _machine(s3_run["tmp"] / "third-box", server)
    output = _run(["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
                   "-c", "configs/demo.yaml", "-c", str(FAST)], env, ok=False)
    assert f"s3://{BUCKET}/runs/e2e/jawiki_tokens has no _manifest.json" in output
    s3_run.setdefault("outputs", []).append(output)


def test_credentials_never_appear_in_logs_metadata_or_errors(s3_run):
    texts = [s3_run["output"], *s3_run.get("outputs", [])]
    for home in s3_run["tmp"].glob("*/dagster_home"):
        for path in home.rglob("*"):
            if path.is_file():
                texts.append(path.read_bytes().decode("utf-8", "replace"))
    for key, data in _bucket(s3_run["server"]).items():
        if key.endswith((".json", ".txt")):
            texts.append(data.decode("utf-8", "replace"))
    assert len(texts) > 5
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
