"""What the fault bench (`bench/faults.py`) builds its scenarios from: a workspace, real servers, killable children.

A child is `python -m bench.faults_lab JOB '{json args}'`: one library call (a download, a corpus
build, token shards, a publish, a training stage) in its own process group, so that SIGKILL takes
it and its workers down at once with no clean-up, as a crash or an OOM kill would.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import lzma
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real HTTP and S3 servers of the test suite: the bench injects the same faults they offer.
sys.path.insert(0, str(REPO_ROOT / "tests"))
from http_server import FileHTTPServer  # noqa: E402  (re-exported for bench.faults)
from s3_server import MotoServer  # noqa: E402

__all__ = ["CuttableProxy", "FileHTTPServer", "Lab", "MotoServer", "Run", "ScenarioFailed", "child_result",
           "kill_group", "kill_when", "run_child", "sha256_bytes", "sha256_path", "start_child", "tree_digest"]

SHARED_CORPORA = Path(os.environ.get("TINYPLM_SHARED", REPO_ROOT.parent / "shared")) / "corpora"
DEMO_DIR = REPO_ROOT / "data" / "demo"
MODEL_CONFIG = REPO_ROOT / "configs" / "model" / "bert-demo.json"
TRAIN_ARGS = REPO_ROOT / "configs" / "train" / "demo-stage1.json"
RESULT_PREFIX = "RESULT "
# Slices of the shared samples: big enough that a kill lands mid-way (the cc100 slice takes
# ~0.3 s to build on one core here, the shards ~2 s), small enough for a bench of about a minute.
CC100_SLICE_LINES = 40_000
JAWIKI_SLICE_ARTICLES = 600


class ScenarioFailed(AssertionError):
    """A check that ends the scenario at once (what follows would make no sense without it)."""


class Run:
    """The record of one scenario: notes, failed checks, and artifacts that ended wrong or missing."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.data_lost = 0

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise ScenarioFailed(what)

    def artifact(self, ok: bool, what: str) -> bool:
        """An artifact that must be intact; a wrong or missing one counts as data lost."""
        if not ok:
            self.data_lost += 1
            self.failures.append(f"data lost: {what}")
        return bool(ok)

    def raises(self, error: type[BaseException], call: Callable[[], object], *mentions: str) -> BaseException:
        """The error `call()` must raise, its message checked to name each of `mentions`."""
        try:
            call()
        except error as exc:
            message = str(exc)
            for text in mentions:
                self.check(str(text) in message, f"the {type(exc).__name__} does not name {text!r}: {message}")
            self.note(f"{type(exc).__name__}: {_short(message)}")
            return exc
        raise ScenarioFailed(f"expected {error.__name__}, but the call succeeded")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(directory: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_path(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not skip(p.relative_to(directory).as_posix())}


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

    def _cached(self, key: str, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def payload(self) -> bytes:
        """3 MB of seeded random bytes, not a multiple of any chunk size, for download scenarios."""
        return self._cached("payload", lambda: random.Random(7).randbytes(3 * 1024 * 1024 + 4321))

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
        return self._cached("cc100", build)

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
        return self._cached("jawiki", build)

    def demo_data(self) -> Path:
        """Demo JaWiki corpus -> tokenizer (vocab 2,000) -> token shards, as test_training builds them."""
        def build() -> Path:
            from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
            from tinyplm_lib.tokens.shards import encode_corpus
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
        return self._cached("demo-data", build)

    def moto(self) -> MotoServer:
        """One moto_server for the whole run (started on first use, stopped by close())."""
        if self._moto is None:
            self._moto = MotoServer().start()
        return self._moto


# -- children ---------------------------------------------------------------------------------


def start_child(job: str, log: Path, env: dict | None = None, **args) -> subprocess.Popen:
    """`python -m bench.faults_lab job args` in a new session; its output goes to `log`."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", "bench.faults_lab", job, json.dumps(args)], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def child_result(process: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """The RESULT the child printed; ScenarioFailed with its output when it failed."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise ScenarioFailed(f"child {process.args[3]} still running after {timeout} s") from None
    output = log.read_text(encoding="utf-8", errors="replace")
    if process.returncode != 0:
        raise ScenarioFailed(f"child {process.args[3]} exited {process.returncode}: {output[-2000:]}")
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise ScenarioFailed(f"child {process.args[3]} printed no result: {output[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_child(job: str, log: Path, ready: Callable[[], bool] | None = None, **args) -> tuple[dict, float]:
    """Run a child to the end: (its result, seconds from `ready()` first true to its exit)."""
    process = start_child(job, log, **args)
    seen = None
    while process.poll() is None:
        if seen is None and ready is not None and ready():
            seen = time.monotonic()
        time.sleep(0.002)
    ended = time.monotonic()
    return child_result(process, log), ended - (seen if seen is not None else ended)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 120) -> bool:
    """SIGKILL the child's process group `delay` s after `ready()` turns true.

    True if the kill landed while the child ran; False if it finished (or died) first.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            kill_group(process)
            raise ScenarioFailed(f"child {process.args[3]} never got ready in {timeout} s")
        time.sleep(0.002)
    stop = time.monotonic() + delay
    while time.monotonic() < stop:
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    if process.poll() is not None:
        return False
    kill_group(process)
    return process.returncode == -signal.SIGKILL


# -- a TCP proxy that can cut every connection (an S3 endpoint whose network goes away) -------------


class CuttableProxy:
    """Forwards 127.0.0.1:port to a target; `cut()` closes every connection, new ones included."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                _close(sock)
            self._sockets.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- the jobs a child runs --------------------------------------------------------------------


def _job_download(args: dict) -> dict:
    from tinyplm_lib.downloads.sources import download

    return download(args["url"], Path(args["dest"]), progress=False, backoff=0.0, max_retries=args.get("retries", 0),
                    chunk_size=args.get("chunk_size", 1 << 16)).to_dict()


def _job_corpus_step(args: dict) -> dict:
    """An asset's whole step: staging dir -> corpus build -> atomic publish of both splits."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    store = LocalArtifactStore(Path(args["root"]))
    staged = {split: store.staging_dir(f"{args['corpus']}_{split}") for split in ("train", "validation")}
    if args["corpus"] == "cc100":
        stats = build_cc100_corpus(Path(args["raw"]), staged["train"] / "sentences.txt",
                                   staged["validation"] / "sentences.txt", Cc100Settings(**args["settings"]), workers=1)
    else:
        stats = build_jawiki_corpus(Path(args["raw"]), staged["train"] / "sentences.txt",
                                    staged["validation"] / "sentences.txt", JawikiSettings(**args["settings"]),
                                    workers=1)
    manifests = {split: store.publish(f"{args['corpus']}_{split}", path).manifest for split, path in staged.items()}
    return {"manifests": manifests, "lines_train": stats.lines_train}


def _job_shards(args: dict) -> dict:
    from tinyplm_lib.tokens.shards import encode_corpus

    meta = encode_corpus(Path(args["text"]), Path(args["tokenizer"]), Path(args["out"]), workers=1,
                         shard_lines=args["shard_lines"])
    return {key: meta[key] for key in ("shards_encoded", "shards_reused", "num_tokens")}


def _job_publish(args: dict) -> dict:
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    return LocalArtifactStore(Path(args["root"])).publish(args["key"], Path(args["source"])).manifest


def _job_s3_publish(args: dict) -> dict:
    import boto3

    from tinyplm_lib.store.s3 import S3ArtifactStore

    client = boto3.client("s3", endpoint_url=args["endpoint"])
    store = S3ArtifactStore(Path(args["cache"]), client, args["bucket"], args["prefix"])
    return store.publish(args["key"], Path(args["source"])).manifest


def _job_hold_staging(args: dict) -> dict:
    """Claim a staging dir, half-fill it, and wait to be killed (a crashed or a live writer)."""
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    staging = LocalArtifactStore(Path(args["root"])).staging_dir(args["label"])
    (staging / "sentences.txt").write_text("half-written by another run\n", encoding="utf-8")
    Path(args["ready"]).write_text(str(staging), encoding="utf-8")
    time.sleep(600)
    return {}


def _job_train(args: dict) -> dict:
    from tinyplm_lib.training.checkpoints import LocalCheckpointSink
    from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

    data, pace = Path(args["data"]), args["pace"]
    options = StageOptions(model_config=MODEL_CONFIG, training_args=TRAIN_ARGS, max_seq_length=64,
                           overrides={"max_steps": args["steps"], "save_steps": args["save_steps"],
                                      "logging_steps": args["save_steps"]})
    metrics = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", Path(args["out"]),
                          options, print, checkpoints=LocalCheckpointSink(Path(args["checkpoints"])),
                          on_step=lambda step: time.sleep(pace), runtime=RuntimeOptions(dataloader_workers=0))
    return {key: metrics[key] for key in ("global_step", "eval_loss", "resumed_from_step")}


JOBS: dict[str, Callable[[dict], dict]] = {
    "download": _job_download, "corpus_step": _job_corpus_step, "shards": _job_shards,
    "publish": _job_publish, "s3_publish": _job_s3_publish, "hold_staging": _job_hold_staging,
    "train": _job_train,
}


if __name__ == "__main__":
    result = JOBS[sys.argv[1]](json.loads(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
