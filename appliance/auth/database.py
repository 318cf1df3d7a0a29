"""Where the auth data lives, and the few places where SQLite and PostgreSQL differ.

SQLite (a file under the auth directory) is the embedded default; `auth.database_url`
puts the same data on PostgreSQL, shared by several nodes. Both engines run the same
statements and the same migrations (appliance/auth/migrations.py, one schema history):
they are written in SQLite's dialect, and `statement` and `schema` below translate
the handful of differences for PostgreSQL in one place, so no second copy of the schema
can drift from the first:

- placeholders `?` become `%s` (and a literal `%` becomes `%%`);
- `INTEGER PRIMARY KEY` becomes a BIGINT identity column, every other INTEGER a
  BIGINT (sizes and quotas pass 2^31), REAL a DOUBLE PRECISION;
- `INSERT OR IGNORE` becomes `INSERT ... ON CONFLICT DO NOTHING`;
- `BEGIN IMMEDIATE` (take the write lock now) becomes `BEGIN`: PostgreSQL locks rows;
- `rowid` becomes `ctid` (a row's identity within a statement; PostgreSQL's is not
  insertion order, so statements order by a time column first).

SQLite's `user_version` pragma is a one-row `appliance_schema` table on PostgreSQL.

The password is never part of the URL: it is read from a file when connecting, so
neither the settings, the service's config nor any message carries it. This module
imports no driver: reconfigure on SQLite must not pay for psycopg's import.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

URL_SCHEMES = ("postgresql", "postgres")

ADVISORY_NAMESPACE = 0x41505043  # "APPC": the first key of every advisory lock we take
"""PostgreSQL advisory locks are keyed by two 32-bit integers; the first one says "the
appliance", the second one which lock (below), so no other application's locks collide."""
MIGRATION_LOCK = 1
"""Held while one node migrates the schema: a second node waits, then finds it current."""
MAINTENANCE_LOCK = 2
"""Held, for the whole window, by the process that opened a maintenance window; its
session ending (even kill -9: the server closes the connection) ends the window."""
CLUSTER_RUN_LOCK = 3
"""Held by a garbage collection, retention run or key rotation: one at a time, cluster-wide."""


@dataclass(frozen=True)
class PostgresDatabase:
    """The auth database on a PostgreSQL server: `url` has no password; `password_file`,
    when set, holds it (one line), read at each connection."""

    url: str
    password_file: Path | None = None

    def __str__(self) -> str:
        return self.url

    def connection_options(self) -> dict[str, object]:
        """What psycopg.connect gets: the URL, and the password from its file."""
        options: dict[str, object] = {"conninfo": self.url}
        if self.password_file is not None:
            options["password"] = read_password(self.password_file)
        return options


Database = Path | PostgresDatabase
"""Either engine: a SQLite file, or a PostgreSQL database."""


def read_password(path: Path) -> str:
    """The first line of the password file; an unreadable file is one sentence (that
    names the file, never its content)."""
    from appliance.errors import AuthError

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise AuthError(
            f"The auth database password file {path} cannot be read ({error.strerror});"
            " check auth.database_password_file and that the file exists."
        ) from error
    lines = text.splitlines()
    return lines[0] if lines else ""


def url_problem(url: str) -> str | None:
    """Why `url` is not a usable `postgresql://user@host[:port][,host2[:port]]/db` (a
    phrase that never repeats the URL, which may hold a password), None when it is.
    Several hosts are libpq's failover list (with ?target_session_attrs=read-write the
    node connects to whichever is the primary)."""
    if any(c.isspace() for c in url) or "#" in url:
        return "must not hold spaces or a #fragment"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in URL_SCHEMES:
        return "must start with postgresql://"
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    parameters = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    if ":" in userinfo or parameters & {"password", "sslpassword"}:
        return (
            "must not hold the password (postgresql://user@host:port/db); put it in the file"
            " named by auth.database_password_file"
        )
    if not at or not unquote(userinfo):
        return "names no user: postgresql://user@host:port/db"
    for host in hosts.split(","):
        problem = _host_problem(host)
        if problem:
            return problem
    if not unquote(path) or "/" in path:
        return "names no database (or more than one path part): postgresql://user@host:port/db"
    return None


def _host_problem(host: str) -> str | None:
    try:
        parts = urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        return "has a port outside 1-65535 or a malformed host"
    if not parts.hostname:
        return "names no host: postgresql://user@host:port/db"
    if port is not None and not 0 < port < 65536:
        return "has a port outside 1-65535"
    return None


def database_of(value: str | Path, password_file: str | Path | None = None) -> Database:
    """The database a config value names: a postgresql:// URL, or the SQLite file's path."""
    text = str(value)
    if text.split("://", 1)[0] in URL_SCHEMES and "://" in text:
        return PostgresDatabase(text, Path(password_file) if password_file else None)
    return Path(text)


# -- the dialect ---------------------------------------------------------------------------
_WORD = {
    r"\bBEGIN IMMEDIATE\b": "BEGIN",
    r"\browid\b": "ctid",
}


@functools.lru_cache(maxsize=512)
def statement(sql: str) -> str:
    """A statement of the store (SQLite dialect, `?` parameters) as PostgreSQL reads it."""
    out = sql.replace("%", "%%").replace("?", "%s")
    for pattern, replacement in _WORD.items():
        out = re.sub(pattern, replacement, out)
    return _insert_or_ignore(out)


def schema(ddl: str) -> str:
    """A migration's statement (SQLite dialect, no parameters) as PostgreSQL reads it."""
    out = re.sub(
        r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        ddl,
        flags=re.IGNORECASE,
    )
    out = re.sub(r"\bINTEGER\b", "BIGINT", out, flags=re.IGNORECASE)
    out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out, flags=re.IGNORECASE)
    return _insert_or_ignore(out)


def _insert_or_ignore(sql: str) -> str:
    if not re.search(r"\bINSERT\s+OR\s+IGNORE\s+INTO\b", sql, re.IGNORECASE):
        return sql
    out = re.sub(r"\bINSERT\s+OR\s+IGNORE\s+INTO\b", "INSERT INTO", sql, flags=re.IGNORECASE)
    return out.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
