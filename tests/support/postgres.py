"""A real PostgreSQL server for tests: Debian's postgresql, `initdb` into a temporary
directory, started on a free loopback port, once per test session; every test that asks
gets a database of its own.

initdb and postgres refuse to run as root: as root (CI), the server runs as `nobody`
in a directory that account owns. Password authentication over TCP (scram-sha-256)
is on, so the appliance's password file is exercised; the password files the tests
hand out are the appliance's kind: one line, mode 0600.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.auth.database import PostgresDatabase
from tests.support.appliance import free_port

PG_BIN = Path(os.environ.get("APPLIANCE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "appliance_test"
PASSWORD = "a-test-only-password"  # loopback only, a throwaway cluster


@dataclass
class PostgresServer:
    """One running cluster: where it listens and how to get a fresh database."""

    directory: Path
    host: str
    port: int
    password_file: Path
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", "db"): where it runs
    _numbers: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def url(self, name: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{SUPERUSER}@{host}:{self.port}/{name}"

    def create_database(self) -> PostgresDatabase:
        """A new, empty database on this server, as the appliance would be given it."""
        name = f"test_{os.getpid()}_{next(self._numbers)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return PostgresDatabase(self.url(name), self.password_file)

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (through `prefix`: psql in its namespace)."""
        if self.prefix:
            result = subprocess.run(
                [*self.prefix, str(PG_BIN / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1",
                 "-c", statement, self.url(database)],
                capture_output=True, text=True, env={**os.environ, "PGPASSWORD": PASSWORD},
                timeout=30,
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip())
            return [tuple(line.split("|")) for line in result.stdout.splitlines()]
        import psycopg

        with psycopg.connect(
            self.url(database), password=PASSWORD, autocommit=True, connect_timeout=10
        ) as connection:
            cursor = connection.execute(statement)
            return cursor.fetchall() if cursor.description else []


def _as_server_account(command: list[str]) -> list[str]:
    """The command, run as `nobody` when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
    return command


def start_server(
    base: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    prefix: tuple[str, ...] = (),
) -> tuple[PostgresServer, subprocess.Popen]:
    """initdb into `base`, then the server on `host`:`port` (a free loopback port by
    default). Another address (a network namespace's, say) is also let in by
    pg_hba.conf, with passwords; `prefix` runs the server under a command such as
    `ip netns exec NS`, and the readiness check is made through it too."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(
            f"PostgreSQL is not installed ({PG_BIN}/initdb is missing): run ./bootstrap"
            " --deps-only (Debian package postgresql), or set APPLIANCE_PG_BIN."
        )
    data = base / "data"
    base.mkdir(parents=True, exist_ok=True)
    superuser_password = base / "superuser-password"
    superuser_password.write_text(PASSWORD + "\n")
    password_file = base / "appliance-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    if os.geteuid() == 0:
        base.chmod(0o755)
        shutil.chown(superuser_password, "nobody", "nogroup")
        data.mkdir(mode=0o700)
        shutil.chown(data, "nobody", "nogroup")
    initdb = subprocess.run(
        _as_server_account(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                f"--pwfile={superuser_password}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        ),
        capture_output=True,
        text=True,
    )
    if initdb.returncode != 0:  # e.g. a parent directory `nobody` cannot traverse
        pytest.fail(f"initdb failed in {data}: {initdb.stderr.strip()[-2000:]}")
    if host not in ("127.0.0.1", "::1", "localhost"):
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
    port = port or free_port()
    log = base / "postgres.log"
    log_handle = open(log, "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            *prefix,
            *_as_server_account(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(data),
                    "-c",
                    f"listen_addresses={host}",
                    "-c",
                    f"port={port}",
                    "-c",
                    f"unix_socket_directories={data}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                ]
            ),
        ],
        stdout=log_handle,
        stderr=subprocess.STDOUT,
    )
    server = PostgresServer(base, host, port, password_file, prefix)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.sql("SELECT 1")
            return server, process
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"postgres did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (started on first use)."""
    base = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    server, process = start_server(base)
    try:
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # fast shutdown: clients still connected are cut
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> PostgresDatabase:
    """A fresh, empty database of its own for one test (its URL and password file)."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def auth_database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | PostgresDatabase:
    """The auth database on each engine in turn: a SQLite file under tmp_path, then a
    fresh PostgreSQL database (a test that takes it runs twice)."""
    if request.param == "sqlite":
        return tmp_path / "auth.db"
    return request.getfixturevalue("postgres_database")
