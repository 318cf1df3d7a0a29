"""The auth store's PostgreSQL engine: connections through psycopg 3, the schema history
kept in a table, and the advisory locks that keep several nodes from stepping on each
other. Imported only when `auth.database_url` is set (appliance/auth/store.py asks).

A connection is in autocommit mode, like the store's SQLite connections: a statement
is its own transaction unless the store opens one with BEGIN, so the same code runs on
both engines. Statements are translated once each (appliance/auth/database.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from appliance.auth import database as dialect
from appliance.auth.database import ADVISORY_NAMESPACE, MIGRATION_LOCK, PostgresDatabase
from appliance.auth.migrations import MIGRATIONS
from appliance.errors import AuthError

Error = psycopg.Error
IntegrityError = psycopg.IntegrityError

CONNECT_TIMEOUT = 10
"""Seconds to reach the server before the sentence below: a node whose database host is
down answers 503 at /-/health instead of hanging."""

SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS appliance_schema (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    version INTEGER NOT NULL
)
"""
"""SQLite's user_version pragma, on PostgreSQL: the number of migrations applied."""

MAINTENANCE_TABLE = """
CREATE TABLE IF NOT EXISTS appliance_maintenance (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    reason TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    expected_end DOUBLE PRECISION NOT NULL,
    phase TEXT NOT NULL,
    node TEXT NOT NULL
)
"""
"""The maintenance window every node's token service reads (appliance/auth/cluster.py).
Not a migration: it exists only on PostgreSQL (a single host keeps its marker file),
and is created beside the schema table, under the migration lock."""


class Connection:
    """A psycopg connection that takes the store's statements (SQLite dialect).

    A connection the server dropped while it sat idle (a restart, a failover, an idle
    timeout) fails its next statement before running it: that statement is sent once
    more on a new connection, unless a transaction was open (its earlier statements
    are gone with the session, so the caller's transaction fails as a whole)."""

    def __init__(self, raw: psycopg.Connection, database: PostgresDatabase | None = None) -> None:
        self.raw, self.database = raw, database
        self._in_transaction = False

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        params = tuple(params)
        translated = dialect.statement(sql)
        word = sql.lstrip()[:8].upper()
        try:
            cursor = self.raw.execute(translated, params if params else None)
        except psycopg.OperationalError:
            if not self.raw.broken or self._in_transaction or self.database is None:
                self._in_transaction = False
                raise
            self.raw = connect(self.database).raw
            cursor = self.raw.execute(translated, params if params else None)
        if word.startswith("BEGIN"):
            self._in_transaction = True
        elif word.startswith(("COMMIT", "ROLLBACK")):
            self._in_transaction = False
        return cursor

    def close(self) -> None:
        self.raw.close()

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken


def connect(database: PostgresDatabase) -> Connection:
    """A connection in autocommit mode; a server that cannot be reached or refuses us is
    one AuthError sentence naming the URL (never the password)."""
    try:
        raw = psycopg.connect(
            **database.connection_options(),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="appliance",
        )
    except psycopg.Error as error:
        reason = " ".join(_first_line(error).split())
        raise AuthError(
            f"The auth database {database.url} cannot be reached ({reason}); check"
            " auth.database_url, auth.database_password_file and that the server accepts"
            " this host."
        ) from error
    return Connection(raw, database)


@contextlib.contextmanager
def advisory_lock(connection: Connection, key: int) -> Iterator[None]:
    """Hold the cluster-wide advisory lock `key` (waiting for it) for the block."""
    connection.raw.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_NAMESPACE, key))
    try:
        yield
    finally:
        if not connection.broken:
            connection.raw.execute("SELECT pg_advisory_unlock(%s, %s)", (ADVISORY_NAMESPACE, key))


def try_advisory_lock(connection: Connection, key: int) -> bool:
    """Take the advisory lock `key` for the connection's session if nobody holds it."""
    row = connection.raw.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (ADVISORY_NAMESPACE, key)
    ).fetchone()
    return bool(row and row[0])


def _version(connection: Connection) -> int | None:
    """The schema number, None before the schema table exists."""
    exists = connection.raw.execute("SELECT to_regclass('appliance_schema')").fetchone()[0]
    if exists is None:
        return None
    row = connection.raw.execute("SELECT version FROM appliance_schema").fetchone()
    return row[0] if row else 0


def ensure_schema(database: PostgresDatabase) -> int:
    """Bring the database to the latest schema; returns how many migrations this call
    applied. Two nodes reconfiguring at the same moment: the second waits on the
    migration lock, then finds the schema current and applies none. All migrations of
    one call are one transaction (PostgreSQL's DDL is transactional): a failure leaves
    the schema where it was."""
    connection = connect(database)
    try:
        with advisory_lock(connection, MIGRATION_LOCK):
            raw = connection.raw
            with raw.transaction():
                raw.execute(SCHEMA_TABLE)
                raw.execute(MAINTENANCE_TABLE)
                version = _version(connection) or 0
                for script in MIGRATIONS[version:]:
                    for sql in script.split(";"):
                        if sql.strip():
                            raw.execute(dialect.schema(sql))
                raw.execute(
                    "INSERT INTO appliance_schema (version) VALUES (%s)"
                    " ON CONFLICT (only_row) DO UPDATE SET version = excluded.version",
                    (len(MIGRATIONS),),
                )
            return len(MIGRATIONS) - version
    except psycopg.Error as error:
        raise AuthError(
            f"The auth database {database.url} could not be migrated: {_first_line(error)}."
        ) from error
    finally:
        connection.close()


def schema_version(database: PostgresDatabase) -> int | None:
    """The schema number reached, None when the database holds no schema yet."""
    connection = connect(database)
    try:
        return _version(connection)
    except psycopg.Error as error:
        raise AuthError(
            f"The auth database {database.url} cannot be read: {_first_line(error)}."
        ) from error
    finally:
        connection.close()


def query(database: PostgresDatabase, sql: str, params: tuple = ()) -> list[tuple]:
    """One read (store dialect) on a connection of its own; [] while the schema lacks
    the table (reconfigure asks before its schema step has run)."""
    connection = connect(database)
    try:
        return connection.execute(sql, params).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    finally:
        connection.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__).rstrip(".")
