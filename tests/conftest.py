"""Shared test fixtures: offline environment, the real corpora in ../shared, and what several modules build.

Built once per session (per xdist worker): the demo JaWiki tokenizer and shards (`data`) and the
demo graph materialised by the CLI into a local S3 bucket (`demo_run`, `demo_s3`). `make test`
runs every test, `make test-fast` those not marked `slow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: Hub and datasets lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under xdist torch gets cores / workers threads, in each worker and in the dagster and torchrun
# processes it starts: with torch's default (every core) two workers' training processes spin-wait
# for each other's cores. The end-to-end modules (then 3 graph runs) on 2 workers and 2 cores took
# 366 s with the default, 264 s with this.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _threads)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = Path(os.environ.get("TINYPLM_SHARED", REPO_ROOT.parent / "shared")) / "corpora"
DEMO_DIR = REPO_ROOT / "data" / "demo"


# Modules that read one session fixture too costly to build twice (the demo graph run by the CLI
# takes ~2 min on 2 cores) count as one file for xdist's `--dist loadfile` (`make test`): they run
# on one worker, and the fixture is built once. pytest-xdist 3.8's own `xdist_group` marks are not
# honoured under pytest 9.2 (pytest-xdist issue 1386), hence the scheduler below.
SHARED_FILES = {"test_pipeline.py": "demo_run", "test_s3_pipeline.py": "demo_run", "test_ui_browser.py": "demo_run",
                "test_evaluation_e2e.py": "demo_run"}


def _file_group(path: str) -> str:
    return SHARED_FILES.get(Path(path).name, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` with the SHARED_FILES of one fixture counted as one file."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _file_group(nodeid.split("::", 1)[0])

    return SharedFixtureScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the order holds for any selection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the files: the shared group first, then files with slow tests, then the rest.

    Started first, the long groups run beside the short ones instead of leaving one worker alone at
    the end (`make test` passes --no-loadscope-reorder so xdist keeps this order).
    """
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(_file_group(item.nodeid.split("::", 1)[0]), []).append(item)

    def rank(group: str) -> int:
        if group in SHARED_FILES.values():
            return 0
        return 1 if any(item.get_closest_marker("slow") for item in groups[group]) else 2

    items[:] = [item for group in sorted(groups, key=rank) for item in groups[group]]


@pytest.fixture(scope="session")
def web_sample() -> Path:
    """Real cc100-format text (Aozora Bunko prose, 150k lines) from ../shared/corpora."""
    path = SHARED_CORPORA / "ja-web-sample.txt.xz"
    assert path.exists(), f"missing shared corpus {path}"
    return path


@pytest.fixture(scope="session")
def wiki_sample() -> Path:
    """Real CirrusSearch-format JaWiki text (995 articles) from ../shared/corpora."""
    path = SHARED_CORPORA / "jawiki-sample-cirrussearch-content.json.gz"
    assert path.exists(), f"missing shared corpus {path}"
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Demo JaWiki → corpus → tokenizer → shards, built with the library alone (training tests' input)."""
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.tokens.shard_writer import encode_corpus
    from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer

    root = tmp_path_factory.mktemp("training")
    build_jawiki_corpus(DEMO_DIR / "demo-jawiki-cirrussearch.json.gz", root / "train.txt",
                        root / "validation.txt", JawikiSettings(validation_fraction=0.15))
    train_tokenizer(root / "train.txt", root / "tok",
                    TokenizerSettings(vocab_size=2000, limit_alphabet=1500, model_max_length=64))
    for split in ("train", "validation"):
        encode_corpus(root / f"{split}.txt", root / "tok", root / "shards" / split)
    return root


@pytest.fixture(scope="session")
def demo_s3():
    """moto_server holding the bucket `demo_run` stores in (tests/demo_instance.py: BUCKET, PREFIX)."""
    from demo_instance import BUCKET
    from s3_server import MotoServer

    with MotoServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_s3):
    """The whole demo graph, materialised once by `dagster job execute` into `demo_s3`; read only."""
    from demo_instance import materialise_demo

    return materialise_demo(tmp_path_factory.mktemp("demo"), demo_s3)
