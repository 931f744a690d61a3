"""A real S3-compatible server for the tests: moto, started as a subprocess on 127.0.0.1 (free port, own process group).

``moto_s3`` (session-scoped) is a moto S3 server shared by every test; ``s3_bucket`` gives each test its own
empty bucket on it. ``start_moto`` starts a separate one, e.g. with IAM authentication switched on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

# moto accepts any credentials unless IAM auth is on; these are obviously fake test values.
TEST_ACCESS_KEY = "testing-access-key"
TEST_SECRET_KEY = "testing-secret-key"
TEST_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def start_moto(extra_env: dict[str, str] | None = None, timeout_s: float = 30.0) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yields its endpoint URL, stops it on exit."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so stopping it stops everything it started
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(endpoint + "/moto-api/"):
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited early: {process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server on {endpoint} did not answer within {timeout_s:.0f} s")
            time.sleep(0.1)
        yield endpoint
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def s3_client(endpoint: str, access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY):
    """A plain boto3 client for a test to look into the bucket directly."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=TEST_REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    )


@dataclass(frozen=True)
class Bucket:
    endpoint: str
    name: str

    @property
    def client(self):
        return s3_client(self.endpoint)

    def object_keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Endpoint URL of a real moto S3 server for the whole test session."""
    with start_moto() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_s3: str) -> Bucket:
    """A fresh, empty bucket on the session's moto server."""
    name = f"castlora-test-{uuid.uuid4().hex[:12]}"
    s3_client(moto_s3).create_bucket(Bucket=name)
    return Bucket(moto_s3, name)


@dataclass(frozen=True)
class IamS3:
    """A moto server that checks request signatures, with one IAM user allowed everything on S3."""

    endpoint: str
    access_key_id: str
    secret_access_key: str

    def create_bucket(self) -> Bucket:
        name = f"castlora-auth-{uuid.uuid4().hex[:12]}"
        s3_client(self.endpoint, self.access_key_id, self.secret_access_key).create_bucket(Bucket=name)
        return AuthBucket(self.endpoint, name, self.access_key_id, self.secret_access_key)


@dataclass(frozen=True)
class AuthBucket(Bucket):
    access_key_id: str = ""
    secret_access_key: str = ""

    @property
    def client(self):
        return s3_client(self.endpoint, self.access_key_id, self.secret_access_key)


@pytest.fixture(scope="session")
def moto_s3_iam() -> Iterator[IamS3]:
    """A second moto server with IAM authentication on: only the user's real key pair is accepted."""
    import json

    import boto3

    # The first three requests (create user, access key, policy) run unauthenticated; every later one is checked.
    with start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name=TEST_REGION, aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="castlora")
        key = iam.create_access_key(UserName="castlora")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="castlora", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        yield IamS3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
