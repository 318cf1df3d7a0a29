"""A real S3 endpoint for tests: moto's server on a free loopback port (the registry's
s3 driver, boto3 and the appliance's own storage reader all speak to it)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.appliance import BIN, free_port


@pytest.fixture
def s3_server() -> Iterator[str]:
    """The endpoint URL of a fresh moto server (no buckets), stopped after the test."""
    with moto_server() as endpoint:
        yield endpoint


@contextmanager
def moto_server() -> Iterator[str]:
    """A fresh moto server's endpoint URL while the block runs (the fixture's, and a
    bench's)."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not listen"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def s3_client(endpoint: str):  # noqa: ANN201 - boto3's client class is generated
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
