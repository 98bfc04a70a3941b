"""A real S3-compatible server for tests: `moto_server` on a free 127.0.0.1 port, over HTTP.

    with MotoServer() as s3:
        client = s3.client()            # boto3 client with test credentials
        s3.env()                        # environment variables for child processes
        key, secret = s3.enforce_auth()  # from now on only these keys are accepted

A server holds one state for every test using it: each test works in a bucket or prefix of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

# Distinctive fake credentials, so tests can grep logs and metadata for any leak.
ACCESS_KEY = "AKIATINYPLMTESTKEY01"
SECRET_KEY = "tinyplm-test-secret-Zq8vX3mN0pL5"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """Starts `moto_server` as a separate process; stop() or the context manager ends it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Self:
        exe = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("moto_server exited at start")
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict:
        """Credentials and region for boto3 in this or a child process."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def enforce_auth(self) -> tuple[str, str]:
        """Make the server check every later request's signature; the keys of a user allowed all of S3.

        moto_server accepts any keys by default (its INITIAL_NO_AUTH_ACTION_COUNT is infinite); its
        `/moto-api/reset-auth` sets that count, here to 0. From then on a request signed with keys
        its IAM does not know fails with InvalidAccessKeyId, one with a wrong secret with
        SignatureDoesNotMatch, and ACCESS_KEY / SECRET_KEY no longer work either.
        """
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        iam.create_user(UserName="tinyplm-test")
        iam.put_user_policy(UserName="tinyplm-test", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tinyplm-test")["AccessKey"]
        # text/plain: with urllib's default form encoding the server reads an empty body and fails.
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["status"] == "ok"
        return key["AccessKeyId"], key["SecretAccessKey"]


def install_env(server: MotoServer) -> None:
    """Put the server's credentials into os.environ (boto3 reads them from there)."""
    os.environ.update(server.env())
