"""The demo graph materialised once per test session by the README's CLI command, and "machines" around it.

`materialise_demo` runs `dagster job execute -m tinyplm_assets.definitions -j pretrain_all -c
configs/demo.yaml` with its own DAGSTER_HOME and TINYPLM_HOME, storing in a bucket on moto_server
(conftest's `demo_run`). Tests only read that machine and its bucket; one that runs more steps uses a
new machine on a copy of the bucket (`copy_bucket`, `machine_env`) or a local copy of the demo
machine (`copy_demo`), so the tests pass in any order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO_ROOT
from s3_server import MotoServer

DAGSTER = str(Path(sys.executable).with_name("dagster"))
BUCKET = "tinyplm-e2e"
PREFIX = "runs/e2e"
# The ops of tinyplm_assets/checks.py: a blocking check's step succeeds only if its checks pass.
CHECK_STEPS = frozenset({"cc100_ja_split_checks", "jawiki_split_checks", "wordpiece_tokenizer_unknown_token_rate",
                         "bert_stage1_cc100_loss_checks", "bert_stage2_jawiki_loss_checks"})
ASSET_STEPS = frozenset({"cc100_ja_raw", "jawiki_raw", "cc100_ja_corpus", "jawiki_corpus", "tokenizer_sample",
                         "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens", "bert_stage1_cc100",
                         "bert_stage2_jawiki", "jglue_jsts_raw", "jglue_jcommonsenseqa_raw", "mlm_eval_set",
                         "bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval", "bert_release"})


@dataclass(frozen=True)
class Machine:
    """One machine's Dagster instance and local root, the environment pointing at them, a run's output."""

    root: Path
    env: dict
    output: str = ""

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def artifacts(self) -> Path:
        """The local store, or with S3 the cache, which on the machine that built them holds every artifact."""
        return self.root / "home" / "artifacts"


def machine_env(root: Path, s3: MotoServer | None = None, bucket: str = BUCKET) -> dict:
    """A new machine under `root` (instance with the repository's dagster.yaml); with `s3`, storing in `bucket`."""
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    # Nothing of the developer's own storage settings or AWS credentials reaches the test's processes.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TINYPLM_"))}
    env.update(TINYPLM_HOME=str(root / "home"), DAGSTER_HOME=str(root / "dagster_home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    if s3 is not None:
        env.update(s3.env(), TINYPLM_S3_BUCKET=bucket, TINYPLM_S3_ENDPOINT_URL=s3.endpoint, TINYPLM_S3_PREFIX=PREFIX)
    return env


def copy_bucket(s3: MotoServer, target: str, source: str = BUCKET) -> None:
    """A new bucket `target` holding a copy of every object of `source` (server-side copies, ~1 s)."""
    client = s3.client()
    client.create_bucket(Bucket=target)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source):
        for obj in page.get("Contents", []):
            client.copy_object(Bucket=target, Key=obj["Key"], CopySource={"Bucket": source, "Key": obj["Key"]})


def run_dagster(args: list[str], env: dict, ok: bool = True, timeout: int = 900) -> str:
    """`dagster ARGS` from the repository root; its stdout + stderr, after asserting how it exited."""
    result = subprocess.run([DAGSTER, *args], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, output[-8000:]
    return output


def succeeded_steps(dagster_home: str | Path) -> set[str]:
    """Steps that succeeded in the newest run of an instance, read from its event log.

    (Parsing the CLI output is not enough: step processes write to one stream concurrently.)
    """
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        run = instance.get_runs(limit=1)[0]
        return {event.step_key for event in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)}


def newest_run_id(dagster_home: str | Path) -> str:
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        return instance.get_runs(limit=1)[0].run_id


def materialise_demo(root: Path, s3: MotoServer) -> Machine:
    """The whole demo graph as `make demo` runs it (demo training: the stage-2 loss means something), on S3."""
    env = machine_env(root, s3)
    output = run_dagster(["job", "execute", "-m", "tinyplm_assets.definitions", "-j", "pretrain_all",
                          "-c", "configs/demo.yaml"], env)
    return Machine(root, env, output)


def copy_demo(demo: Machine, root: Path) -> Machine:
    """A machine with a copy of the demo instance and artifacts (~10 MB) as its local store.

    `copytree` keeps modification times, so the copy's files look as old as the originals.
    """
    shutil.copytree(demo.dagster_home, root / "dagster_home")
    shutil.copytree(demo.root / "home", root / "home", ignore=shutil.ignore_patterns(".staging"))
    return Machine(root, machine_env(root))
