"""Shared test fixtures: offline environment, paths to the real corpora in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: Hub and datasets lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = Path(os.environ.get("TINYPLM_SHARED", REPO_ROOT.parent / "shared")) / "corpora"
DEMO_DIR = REPO_ROOT / "data" / "demo"


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
