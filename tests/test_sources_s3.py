"""Tests for s3:// sources (tinyplm_lib.downloads.s3), against a real `moto_server` (tests/s3_server.py).

Dropped connections come from a small TCP proxy in front of moto that cuts one response mid-body,
so botocore raises whatever it really raises for a broken stream. Server-side errors that moto
cannot be made to send (503, an error message echoing the access key) are injected through
botocore's ``before-call`` event, which short-circuits the HTTP request with a canned answer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import select
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import pytest

from tinyplm_lib.downloads import source
from tinyplm_lib.downloads.download import DownloadError, DownloadResult, download
from tinyplm_lib.errors import ConfigError

from s3_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer  # tests/ is on sys.path

SIZE = 3 * 1024 * 1024 + 12345  # a few MB, not a multiple of the chunk size
FAST = {"progress": False, "backoff": 0.0, "chunk_size": 256 * 1024}
SECRETS = (ACCESS_KEY, SECRET_KEY)
_BUCKETS = itertools.count()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Any:
    with MotoServer() as server:
        yield server


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    """A fresh bucket per test (moto keeps state for the whole module)."""
    name = f"corpus-{next(_BUCKETS)}"
    moto.create_bucket(name)
    return name


@pytest.fixture
def payload() -> bytes:
    return random.Random(1234).randbytes(SIZE)


@pytest.fixture
def obj(moto: MotoServer, bucket: str, payload: bytes) -> str:
    """``s3://`` URL of ``payload`` stored as ``data.bin``."""
    moto.client().put_object(Bucket=bucket, Key="data.bin", Body=payload)
    return f"s3://{bucket}/data.bin"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "data.bin"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Isolate boto3 from any AWS configuration on the machine; return a function that points it at a server."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def point_at(server: MotoServer) -> None:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)

    return point_at


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + ".*")) if dest.parent.exists() else []


def _record(client: Any, operation: str = "GetObject") -> list[dict[str, Any]]:
    """The API parameters of every ``operation`` call ``client`` makes from now on."""
    calls: list[dict[str, Any]] = []
    client.meta.events.register(f"provide-client-params.s3.{operation}", lambda params, **_: calls.append(dict(params)))
    return calls


def _inject_errors(client: Any, answers: list[tuple[int, str, str]], operation: str = "GetObject") -> None:
    """Answer the next calls with canned S3 errors ``(status, code, message)`` instead of sending them."""

    def answer(**_: Any) -> Any:
        if not answers:
            return None  # go to the server as usual
        status, code, message = answers.pop(0)
        parsed = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return SimpleNamespace(status_code=status, headers={}, content=b"", raw=None), parsed

    client.meta.events.register(f"before-call.s3.{operation}", answer)


def _secret_free(exc: BaseException) -> None:
    """No access key or secret in the exception or in anything a traceback of it would print."""
    seen: BaseException | None = exc
    while seen is not None:
        for secret in SECRETS:
            assert secret not in str(seen), f"{type(seen).__name__} shows a credential: {seen}"
            assert secret not in repr(seen.args)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


class DroppingProxy:
    """A TCP proxy to ``port`` that can cut the next new connection after N response-body bytes."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._drop_after: int | None = None
        self.drops = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping = True
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def drop_next(self, after_body_bytes: int) -> None:
        with self._lock:
            self._drop_after = after_body_bytes

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def _accept(self) -> None:
        self._listener.settimeout(0.1)  # a blocked accept() would not notice the close in __exit__
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                drop_after, self._drop_after = self._drop_after, None
            thread = threading.Thread(target=self._pipe, args=(conn, drop_after), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pipe(self, down: socket.socket, drop_after: int | None) -> None:
        up = socket.create_connection(self.upstream)
        head, body_sent = b"", 0
        try:
            while not self._stopping:
                ready, _, _ = select.select([down, up], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is down:
                        up.sendall(data)
                        continue
                    if drop_after is None:
                        down.sendall(data)
                        continue
                    # Count body bytes of the first response on this connection; cut at drop_after.
                    allowed = len(data)
                    if b"\r\n\r\n" not in head:
                        head += data
                        if b"\r\n\r\n" not in head:
                            down.sendall(data)
                            continue
                        in_body = len(head) - head.index(b"\r\n\r\n") - 4
                        allowed = len(data) - in_body + min(in_body, drop_after)
                        body_sent = min(in_body, drop_after)
                    else:
                        allowed = min(len(data), drop_after - body_sent)
                        body_sent += allowed
                    down.sendall(data[:allowed])
                    if body_sent >= drop_after:
                        self.drops += 1
                        return
        finally:
            for sock in (down, up):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@pytest.fixture
def proxy(moto: MotoServer) -> Any:
    with DroppingProxy(moto.port) as p:
        yield p


# -- URLs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://bucket", "must name one object"),
        ("s3://bucket/", "must name one object"),
        ("s3://bucket/folder/", "must name one object"),
        ("s3:///key", "must name one object"),
        (f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/key", "credentials do not belong"),
    ],
)
def test_bad_s3_urls_are_config_errors(url: str, match: str, dest: Path) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        download(url, dest, s3_client=object(), **FAST)
    assert info.value.setting == "url"
    _secret_free(info.value)
    assert not dest.parent.exists()


# -- plain downloads -----------------------------------------------------------------------------


class _ReadRecorder:
    """Wraps a response Body and records the size asked of each read()."""

    def __init__(self, body: Any, reads: list[int | None]) -> None:
        self._body, self._reads = body, reads

    def read(self, amt: int | None = None) -> bytes:
        self._reads.append(amt)
        return self._body.read(amt)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


def test_plain_download(moto: MotoServer, obj: str, dest: Path, payload: bytes) -> None:
    client = moto.client()
    calls = _record(client)
    reads: list[int | None] = []

    def wrap_body(parsed: dict[str, Any], **_: Any) -> None:
        if "Body" in parsed:
            parsed["Body"] = _ReadRecorder(parsed["Body"], reads)

    client.meta.events.register("after-call.s3.GetObject", wrap_body)
    result = download(obj, dest, expected_sha256=_sha(payload), expected_size=SIZE, s3_client=client, **FAST)
    assert result == DownloadResult(dest, obj, SIZE, _sha(payload), resumed_from=0)
    assert dest.read_bytes() == payload
    json.dumps(result.to_dict())
    assert [c.get("Range") for c in calls] == [None]
    # Streamed in chunk_size pieces, never read whole into memory.
    assert reads and set(reads) == {FAST["chunk_size"]} and len(reads) > SIZE // FAST["chunk_size"]
    assert _leftovers(dest) == []


def test_default_client_reads_the_environment(moto: MotoServer, obj: str, dest: Path, payload: bytes, aws_env) -> None:
    aws_env(moto)
    result = download(obj, dest, **FAST)  # no s3_client: boto3.client("s3") from AWS_* variables
    assert result.sha256 == _sha(payload) and dest.read_bytes() == payload


def test_existing_dest_is_not_downloaded_again(moto: MotoServer, obj: str, dest: Path, payload: bytes) -> None:
    download(obj, dest, s3_client=moto.client(), **FAST)
    client = moto.client()
    calls = _record(client) + _record(client, "HeadObject")
    result = download(obj, dest, expected_sha256=_sha(payload), s3_client=client, **FAST)
    assert result.resumed_from == 0 and result.sha256 == _sha(payload)
    assert calls == []


# -- resume --------------------------------------------------------------------------------------


def test_dropped_stream_is_resumed_within_one_call(proxy: DroppingProxy, obj: str, dest: Path, payload: bytes) -> None:
    cut = 1_000_003
    client = proxy.client()
    calls = _record(client)
    proxy.drop_next(cut)
    result = download(obj, dest, max_retries=2, s3_client=client, **FAST)
    assert proxy.drops == 1
    assert result.sha256 == _sha(payload) and dest.read_bytes() == payload
    assert result.resumed_from == cut
    first, second = calls
    assert "Range" not in first and second["Range"] == f"bytes={cut}-"
    assert second["IfMatch"] == client.head_object(Bucket=obj.split("/")[2], Key="data.bin")["ETag"]


def _interrupted(proxy: DroppingProxy, url: str, dest: Path, cut: int) -> None:
    """Leave ``dest.part`` with ``cut`` bytes, as a download killed mid-way would."""
    proxy.drop_next(cut)
    with pytest.raises(DownloadError, match="giving up after 1 attempt") as info:
        download(url, dest, max_retries=0, s3_client=proxy.client(), **FAST)
    assert proxy.drops == 1
    assert f"connection lost after {cut} bytes: IncompleteReadError" in str(info.value)
    assert url in str(info.value)
    _secret_free(info.value)
    assert not dest.exists()
    assert dest.with_name("data.bin.part").stat().st_size == cut
    sidecar = json.loads(dest.with_name("data.bin.part.json").read_text())
    assert sidecar["total"] == SIZE and sidecar["url"] == url
    assert ACCESS_KEY not in json.dumps(sidecar) and SECRET_KEY not in json.dumps(sidecar)


def test_preexisting_part_is_resumed(
    moto: MotoServer, proxy: DroppingProxy, obj: str, dest: Path, payload: bytes,
) -> None:
    cut = 2 * 1024 * 1024 + 7
    _interrupted(proxy, obj, dest, cut)
    client = moto.client()
    calls = _record(client)
    result = download(obj, dest, expected_sha256=_sha(payload), s3_client=client, **FAST)
    assert result.resumed_from == cut and result.sha256 == _sha(payload) and result.size == SIZE
    assert dest.read_bytes() == payload
    (call,) = calls
    assert call["Range"] == f"bytes={cut}-"
    assert call["IfMatch"] == client.head_object(Bucket=obj.split("/")[2], Key="data.bin")["ETag"]
    assert _leftovers(dest) == []


def test_object_replaced_between_attempts(
    moto: MotoServer, proxy: DroppingProxy, obj: str, bucket: str, dest: Path,
) -> None:
    cut = 1_200_000
    _interrupted(proxy, obj, dest, cut)
    new = random.Random(99).randbytes(SIZE - 1000)
    client = moto.client()
    old_etag = client.head_object(Bucket=bucket, Key="data.bin")["ETag"]
    client.put_object(Bucket=bucket, Key="data.bin", Body=new)
    calls = _record(client)
    result = download(obj, dest, max_retries=0, s3_client=client, **FAST)
    # The ranged request named the old ETag, was refused, and the new object came whole.
    assert [(c.get("Range"), c.get("IfMatch")) for c in calls] == [(f"bytes={cut}-", old_etag), (None, None)]
    assert result.sha256 == _sha(new) and result.size == len(new) and result.resumed_from == 0
    assert dest.read_bytes() == new


@pytest.mark.parametrize("replaced", [False, True])
def test_complete_part_is_checked_then_published(
    moto: MotoServer, proxy: DroppingProxy, obj: str, bucket: str, dest: Path, payload: bytes, replaced: bool,
) -> None:
    # A crash between the last byte and the rename leaves a complete .part behind.
    cut = 500_000
    _interrupted(proxy, obj, dest, cut)
    with open(dest.with_name("data.bin.part"), "ab") as fh:
        fh.write(payload[cut:])
    client = moto.client()
    new = b"replaced\n" * 1000
    if replaced:
        client.put_object(Bucket=bucket, Key="data.bin", Body=new)
    gets, heads = _record(client), _record(client, "HeadObject")
    result = download(obj, dest, s3_client=client, **FAST)
    assert len(heads) == 1 and heads[0]["IfMatch"]
    if replaced:
        assert [c.get("Range") for c in gets] == [None]
        assert result.resumed_from == 0 and dest.read_bytes() == new
    else:
        assert gets == []
        assert result.resumed_from == SIZE and result.sha256 == _sha(payload) and dest.read_bytes() == payload


# -- retries and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "code"), [("missing.bin", "NoSuchKey"), (None, "NoSuchBucket")])
def test_missing_object_fails_at_once(
    moto: MotoServer, bucket: str, dest: Path, monkeypatch: pytest.MonkeyPatch, key: str | None, code: str,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(source, "_sleep", waits.append)
    url = f"s3://{bucket}/{key}" if key else "s3://no-such-bucket-tinyplm/data.bin"
    client = moto.client()
    calls = _record(client)
    with pytest.raises(DownloadError, match=code) as info:
        download(url, dest, max_retries=5, s3_client=client, **FAST)
    assert str(info.value).startswith(f"{url}: ")
    assert len(calls) == 1 and waits == []  # no retry on a client error
    _secret_free(info.value)
    assert not dest.exists()


@pytest.mark.parametrize(("wrong", "code"), [("access_key", "InvalidAccessKeyId"), ("secret", "SignatureDoesNotMatch")])
def test_bad_keys_fail_at_once_without_showing_them(
    payload: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch, wrong: str, code: str,
) -> None:
    import boto3

    waits: list[float] = []
    monkeypatch.setattr(source, "_sleep", waits.append)
    with MotoServer() as checking:  # its own server: `moto` accepts any keys
        checking.create_bucket("corpus-auth")
        checking.client().put_object(Bucket="corpus-auth", Key="data.bin", Body=payload)
        key, secret = checking.enforce_auth()
        bad_key, bad_secret = ("AKIATINYPLMWRONGKEY1", secret) if wrong == "access_key" else (key, "tinyplm-wrong-Xy7")
        client = boto3.client("s3", endpoint_url=checking.endpoint, region_name=REGION,
                              aws_access_key_id=bad_key, aws_secret_access_key=bad_secret)
        calls = _record(client)
        with pytest.raises(DownloadError, match=code) as info:
            download("s3://corpus-auth/data.bin", dest, max_retries=3, s3_client=client, **FAST)
        good = boto3.client("s3", endpoint_url=checking.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)
        assert download("s3://corpus-auth/data.bin", dest, s3_client=good, **FAST).sha256 == _sha(payload)
    assert len(calls) == 1 and waits == []  # refused credentials are not retried
    assert "s3://corpus-auth/data.bin" in str(info.value)
    for text in (bad_key, bad_secret, key, secret):
        assert text not in str(info.value) and text not in repr(info.value.args)


def test_access_denied_fails_at_once(moto: MotoServer, obj: str, dest: Path) -> None:
    client = moto.client()
    calls = _record(client)
    _inject_errors(client, [(403, "AccessDenied", "Access Denied")] * 3)
    with pytest.raises(DownloadError, match=r"AccessDenied \(HTTP 403\)") as info:
        download(obj, dest, max_retries=2, s3_client=client, **FAST)
    assert obj in str(info.value) and len(calls) == 1


def test_5xx_is_retried_with_backoff(
    moto: MotoServer, obj: str, dest: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(source, "_sleep", waits.append)
    client = moto.client()
    calls = _record(client)
    _inject_errors(client, [(503, "SlowDown", "Please reduce your request rate."), (500, "InternalError", "oops")])
    result = download(obj, dest, max_retries=5, s3_client=client, **{**FAST, "backoff": 0.5})
    assert len(calls) == 3 and waits == [0.5, 1.0]
    assert result.sha256 == _sha(payload)


def test_5xx_retries_are_bounded(moto: MotoServer, obj: str, dest: Path) -> None:
    client = moto.client()
    calls = _record(client)
    _inject_errors(client, [(502, "BadGateway", "upstream")] * 10)
    with pytest.raises(DownloadError, match="giving up after 3 attempt") as info:
        download(obj, dest, max_retries=2, s3_client=client, **FAST)
    assert obj in str(info.value) and "HTTP 502" in str(info.value)
    assert len(calls) == 3 and not dest.exists()


def test_unreachable_endpoint_gives_up_quickly(
    obj: str, dest: Path, aws_env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    with MotoServer() as stopped:
        pass  # started and stopped: nothing listens on its port any more
    aws_env(stopped)
    sends: list[str] = []
    real_client = boto3.client

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        client = real_client(*args, **kwargs)
        client.meta.events.register("before-send.s3", lambda **kw: sends.append(kw["event_name"]))
        return client

    monkeypatch.setattr(boto3, "client", counting_client)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="giving up after 3 attempt") as info:
        download(obj, dest, max_retries=2, **{**FAST, "backoff": 0.05})
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f}s"
    # One connection try per attempt: botocore's own retries would multiply max_retries.
    assert sends == ["before-send.s3.GetObject"] * 3
    assert obj in str(info.value) and "EndpointConnectionError" in str(info.value)
    _secret_free(info.value)
    assert not dest.exists()


# -- expectations and credentials ----------------------------------------------------------------


def test_sha256_mismatch_is_not_published(moto: MotoServer, obj: str, dest: Path, payload: bytes) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(obj, dest, expected_sha256=wrong, s3_client=moto.client(), **FAST)
    assert wrong in str(info.value) and _sha(payload) in str(info.value) and obj in str(info.value)
    assert not dest.exists()
    assert _leftovers(dest) == []


def test_size_mismatch_fails_before_the_body(moto: MotoServer, obj: str, dest: Path) -> None:
    with pytest.raises(DownloadError, match=f"{SIZE} bytes, expected_size is 1000"):
        download(obj, dest, expected_size=1000, s3_client=moto.client(), **FAST)
    assert not dest.exists()


@pytest.mark.parametrize("status", [403, 503])
def test_credentials_echoed_by_the_server_are_not_shown(
    moto: MotoServer, obj: str, dest: Path, status: int,
) -> None:
    # Real S3 puts the access key in SignatureDoesNotMatch/InvalidAccessKeyId bodies; make one echo both.
    echo = f"The request signature we calculated does not match (key {ACCESS_KEY}, secret {SECRET_KEY})"
    client = moto.client()
    _inject_errors(client, [(status, "SignatureDoesNotMatch", echo)] * 2)
    with pytest.raises(DownloadError, match="SignatureDoesNotMatch") as info:
        download(obj, dest, max_retries=1, s3_client=client, **FAST)
    assert obj in str(info.value) and "***" in str(info.value)
    _secret_free(info.value)
