"""The fault bench's workspace: scratch folders, the inputs and servers scenarios share, and digests.

Every `python -m bench.faults` run gets one Lab; the slices of the shared samples, the demo data and
moto_server are built on first use and reused by every scenario that needs them.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import lzma
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tinyplm_lib.files import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
# The real HTTP and S3 servers of the test suite: the bench injects the same faults they offer.
sys.path.insert(0, str(REPO_ROOT / "tests"))
from http_server import FileHTTPServer
from s3_server import MotoServer

SHARED_CORPORA = Path(os.environ.get("TINYPLM_SHARED", REPO_ROOT.parent / "shared")) / "corpora"
DEMO_DIR = REPO_ROOT / "data" / "demo"
# Slices of the shared samples: big enough that a kill lands mid-way (the cc100 slice takes
# ~0.3 s to build on one core here, the shards ~2 s), small enough for a bench of about a minute.
CC100_SLICE_LINES = 40_000
JAWIKI_SLICE_ARTICLES = 600
# Download settings for scenarios: no progress bar, no backoff wait, 64 KiB reads.
FAST = {"progress": False, "backoff": 0.0, "chunk_size": 64 * 1024}
# Corpus settings for the slices (40k cc100 lines, 600 articles): both splits come out non-empty.
CC100_SETTINGS = {"max_lines": 1_000_000, "max_validation_lines": 2_000, "validation_doc_fraction": 0.05}
JAWIKI_SETTINGS = {"validation_fraction": 0.05}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(directory: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not skip(p.relative_to(directory).as_posix())}


def seeded_files(folder: Path, count: int, size: int, seed: int, stem: str = "part") -> Path:
    """`count` files of `size` seeded bytes: an artifact's worth of data to publish."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{stem}-{i:03d}.bin").write_bytes(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32))
    return folder


class Lab:
    """A scratch workspace plus the inputs and servers scenarios share, each built on first use."""

    def __init__(self, root: Path, seed: int = 20261125) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self._cache: dict[str, object] = {}
        self._moto: MotoServer | None = None

    def dir(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def close(self) -> None:
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def cached(self, key: str, build: Callable[[], object]):
        """`build()` on the first call for `key`, its result on every later one."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def payload(self) -> bytes:
        """3 MB of seeded random bytes, not a multiple of any chunk size, for download scenarios."""
        return self.cached("payload", lambda: random.Random(7).randbytes(3 * 1024 * 1024 + 4321))

    def cc100_slice(self) -> Path:
        """The first lines of the shared cc100-format sample (or the demo corpus), as .xz."""
        def build() -> Path:
            source = SHARED_CORPORA / "ja-web-sample.txt.xz"
            if not source.exists():
                return DEMO_DIR / "demo-cc100.txt.xz"
            with lzma.open(source, "rb") as handle:
                data = b"".join(itertools.islice(handle, CC100_SLICE_LINES))
            path = self.root / "inputs" / "cc100-slice.txt.xz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(lzma.compress(data, preset=0))
            return path
        return self.cached("cc100", build)

    def jawiki_slice(self) -> Path:
        """The first articles of the shared CirrusSearch sample (or the demo dump), as .gz."""
        def build() -> Path:
            source = SHARED_CORPORA / "jawiki-sample-cirrussearch-content.json.gz"
            if not source.exists():
                return DEMO_DIR / "demo-jawiki-cirrussearch.json.gz"
            with gzip.open(source, "rb") as handle:
                data = b"".join(itertools.islice(handle, 2 * JAWIKI_SLICE_ARTICLES))
            path = self.root / "inputs" / "jawiki-slice.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
            return path
        return self.cached("jawiki", build)

    def demo_data(self) -> Path:
        """Demo JaWiki corpus -> tokenizer (vocab 2,000) -> token shards, as test_training builds them."""
        def build() -> Path:
            from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
            from tinyplm_lib.tokens.shard_writer import encode_corpus
            from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer

            root = self.root / "demo-data"
            build_jawiki_corpus(DEMO_DIR / "demo-jawiki-cirrussearch.json.gz", root / "train.txt",
                                root / "validation.txt", JawikiSettings(validation_fraction=0.15), workers=1)
            train_tokenizer(root / "train.txt", root / "tok",
                            TokenizerSettings(vocab_size=2000, limit_alphabet=1500, model_max_length=64),
                            workers=1)
            for split in ("train", "validation"):
                encode_corpus(root / f"{split}.txt", root / "tok", root / "shards" / split, workers=1)
            return root
        return self.cached("demo-data", build)

    def moto(self) -> MotoServer:
        """One moto_server for the whole run (started on first use, stopped by close())."""
        if self._moto is None:
            self._moto = MotoServer().start()
        return self._moto

    @contextmanager
    def served(self, name: str, files: dict[str, bytes]) -> Iterator[tuple[FileHTTPServer, Path]]:
        """A real HTTP server on 127.0.0.1 serving `files`, and a scratch folder for the scenario."""
        work = self.dir(name)
        (work / "served").mkdir()
        for file_name, data in files.items():
            (work / "served" / file_name).write_bytes(data)
        with FileHTTPServer(work / "served") as server:
            yield server, work
