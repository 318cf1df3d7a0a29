"""What several nodes on one PostgreSQL auth database share besides the auth data: the
registry's maintenance window, and the rule that one maintenance run (garbage
collection, retention, key rotation) runs at a time cluster-wide.

On one host the window is the marker file (appliance/registry_maintenance.py) and
the storage lock a file lock. With `auth.database_url` the run that opens a window
also writes it to the one-row `appliance_maintenance` table, and holds the advisory
lock MAINTENANCE_LOCK on its own connection for as long as the window lasts. Every
node's token service reads the row (one query, only for a request that asks to push
or delete) and believes it only while that lock is held: a run killed with kill -9
loses its connection, the server drops the lock, and the row is stale, whatever the
row says. This is the marker file's "owner alive" rule, with the database server as
the judge instead of /proc, which no other node can read.

On SQLite every function here does nothing: a single host has its file and its lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import replace

from appliance.auth.database import (
    ADVISORY_NAMESPACE,
    CLUSTER_RUN_LOCK,
    MAINTENANCE_LOCK,
    Database,
    PostgresDatabase,
)
from appliance.errors import ApplianceError
from appliance.registry_maintenance import CLOSING, Window


class ClusterBusy(ApplianceError):
    """Another node (or process) holds the cluster-wide maintenance run lock."""


def node_name() -> str:
    """How other nodes' messages name this one: host name and pid."""
    return f"{socket.gethostname()} pid {os.getpid()}"


_WINDOW = """
SELECT reason, started, expected_end, phase, node, EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s AND objsubid = 2
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
FROM appliance_maintenance
"""


def read_window(connection: object) -> Window | None:
    """The window another node opened, None when there is none or its run is gone
    (`connection`: a store's PostgreSQL connection, appliance/auth/postgres.py)."""
    row = connection.raw.execute(_WINDOW, (ADVISORY_NAMESPACE, MAINTENANCE_LOCK)).fetchone()  # type: ignore[attr-defined]
    if row is None or not row[5]:
        return None
    reason, started, expected_end, phase, _node, _held = row
    # pid 0: a window of another host; its liveness is the lock above, not a pid.
    return Window(reason, started, expected_end, pid=0, pid_start=None, phase=phase)


class SharedWindow:
    """A maintenance window published to every node through the database; a no-op on
    SQLite. open() refuses when another node's window is in force."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._connection = None

    def open(self, window: Window) -> None:
        if not isinstance(self.database, PostgresDatabase):
            return
        from appliance.auth import postgres

        connection = postgres.connect(self.database)
        if not postgres.try_advisory_lock(connection, MAINTENANCE_LOCK):
            current = read_window(connection)
            connection.close()
            raise ClusterBusy(
                "a maintenance window is open on another node"
                + (f" ({current.reason})" if current else "")
                + "; wait for it to end and run this again"
            )
        self._connection = connection
        self._write(window)

    def closing(self, window: Window) -> None:
        """Handing back to read-write: pushes stay refused until close()."""
        if self._connection is not None:
            self._write(replace(window, phase=CLOSING))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if not connection.broken:
                connection.raw.execute("DELETE FROM appliance_maintenance")
        finally:
            connection.close()  # ends the session: its advisory lock goes with it

    def _write(self, window: Window) -> None:
        self._connection.raw.execute(  # type: ignore[union-attr]
            "INSERT INTO appliance_maintenance (reason, started, expected_end, phase, node)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (only_row) DO UPDATE SET"
            " reason = excluded.reason, started = excluded.started,"
            " expected_end = excluded.expected_end, phase = excluded.phase,"
            " node = excluded.node",
            (window.reason, window.started, window.expected_end, window.phase, node_name()),
        )


_HOLDER = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s
  AND l.objsubid = 2
"""


@contextlib.contextmanager
def run_lock(database: Database, what: str) -> Iterator[None]:
    """One maintenance run (garbage collection, retention, key rotation) at a time
    across every node of the database, beside each node's own storage lock; a second
    one exits at once, saying which run holds it and where. Nothing on SQLite."""
    if not isinstance(database, PostgresDatabase):
        yield
        return
    from appliance.auth import postgres

    connection = postgres.connect(database)
    try:
        # Who holds it is what the others' refusal says: the session's application_name.
        holder = f"{what} on {node_name()}"[:63]
        connection.raw.execute("SELECT set_config('application_name', %s, false)", (holder,))
        if not postgres.try_advisory_lock(connection, CLUSTER_RUN_LOCK):
            row = connection.raw.execute(_HOLDER, (ADVISORY_NAMESPACE, CLUSTER_RUN_LOCK)).fetchone()
            raise ClusterBusy(
                f"another maintenance run holds the cluster ({row[0] if row else 'another node'});"
                " wait for it to end and run this again"
            )
        yield
    finally:
        connection.close()  # the lock is the session's: it ends with it
