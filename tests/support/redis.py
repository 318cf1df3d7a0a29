"""A real redis-server for tests: Debian's, on a free loopback port (or any address and
port a caller names, inside a network namespace for instance), nothing saved to disk,
stopped after the test."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.appliance import free_port

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"


@dataclass
class RedisServer:
    host: str
    port: int
    password: str | None
    process: subprocess.Popen
    directory: Path
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NAME): where it runs

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def cli(self, *args: str) -> str:
        """redis-cli's answer to one command (run where the server runs)."""
        auth = ("--no-auth-warning", "-a", self.password) if self.password else ()
        result = subprocess.run(
            [*self.prefix, REDIS_CLI, "-h", self.host, "-p", str(self.port), *auth, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def keys(self, pattern: str = "*") -> list[str]:
        return [line for line in self.cli("--scan", "--pattern", pattern).splitlines() if line]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(
    host: str = "127.0.0.1",
    port: int | None = None,
    password: str | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = 20,
) -> RedisServer:
    """A redis-server listening on host:port (a free loopback port by default), run
    behind `prefix` (`ip netns exec NAME`, say); returns once it answers PING."""
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="redis-"))
    args = [
        REDIS_SERVER,
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    if password:
        args += ["--requirepass", password]
    process = subprocess.Popen(
        [*prefix, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = RedisServer(host, port, password, process, directory, prefix)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if server.cli("PING").strip() == "PONG":
                return server
        except subprocess.CalledProcessError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"redis-server did not answer on {host}:{port}")
        time.sleep(0.1)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server with a password on a free loopback port."""
    server = start_redis(password="redis-test-password")
    try:
        yield server
    finally:
        server.stop()
