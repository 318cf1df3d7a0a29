"""The auth service's data layer: every SQL statement of the service lives in this module.

SQLite in WAL mode is the default store: readers never block the writer, and the
several worker processes of the token server share one file. Each process (and each
thread) opens its own connection lazily, so a connection never crosses a fork.
Statements are plain, portable SQL with `?` parameters: with `auth.database_url` the
same statements run on PostgreSQL (appliance/auth/postgres.py), translated in one
place (appliance/auth/database.py). Every function and the Store take the database as
a `Database`: a SQLite file's Path, or a PostgresDatabase.

Schema changes are numbered migrations applied by `ensure_schema`, which records the
number reached in SQLite's `user_version` pragma (a table on PostgreSQL).

Reconfigure reads the database through this module on every run, a no-op included
(`schema_version`, `user_exists`), so the password hasher (argon2, through
`credentials`) is imported only by the few functions that make a secret: loading it
for every run would cost more than the reads themselves.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.auth.database import Database, PostgresDatabase
from appliance.auth.database_files import check_database_files, chown_database_files
from appliance.auth.migrations import MIGRATIONS
from appliance.auth.names import path_prefixes, validate_project_path, validate_username
from appliance.auth.permissions import (
    PERSONAL_TOKEN_SCOPES,
    ROLES,
    TOKEN_SCOPES,
    VISIBILITIES,
    ProjectAccess,
)
from appliance.auth.tag_rules import Reservation, TagRule
from appliance.errors import AuthError

if TYPE_CHECKING:  # loaded where used: a reconfigure reads this module too
    from appliance.registry_maintenance import Window
    from appliance.retention import Policy


class NotFoundError(AuthError):
    """A named user, project, member or token does not exist."""


class AlreadyExistsError(AuthError):
    """A user, project or membership being created exists already."""


class InvalidValueError(AuthError):
    """A role, visibility or scope outside the allowed set."""


DEPLOY_TOKEN_USERNAME = "appliance+deploy-token-{id}"


@dataclass(frozen=True)
class User:
    id: int
    username: str
    password_hash: str
    admin: bool
    blocked: bool
    credentials_version: int
    created_at: int


@dataclass(frozen=True)
class Project:
    id: int
    path: str
    visibility: str
    registry_enabled: bool
    created_at: int
    quota_bytes: int | None = None


@dataclass(frozen=True)
class Member:
    username: str
    role: str


@dataclass(frozen=True)
class PersonalAccessToken:
    id: int
    user_id: int
    name: str
    scopes: frozenset[str]
    expires_at: int | None
    revoked: bool
    created_at: int

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class DeployToken:
    id: int
    project_id: int
    project_path: str
    name: str
    username: str
    scopes: frozenset[str]
    expires_at: int | None
    revoked: bool
    created_at: int

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class RegistryEvent:
    """One push, pull or delete of a manifest, as the registry reported it."""

    event_id: str
    action: str
    repository: str
    tag: str | None
    digest: str | None
    media_type: str | None
    size: int | None
    actor: str | None
    address: str | None
    user_agent: str | None
    at: float


HISTORY_KEPT = 1000
"""Events kept per repository and kind (pulls on one side, pushes and deletes on the
other), so a pull-heavy repository never pushes its push history out."""


@dataclass(frozen=True)
class WebSession:
    """A signed-in page session (appliance/auth/web), read with its user's row."""

    digest: str
    credentials_version: int
    csrf_token: str
    notice: str | None
    created_at: int
    seen_at: int
    expires_at: int
    user: User
    display_name: str = ""

    def live(self, now: float) -> bool:
        """Still signed in: not expired, the user not blocked, and no password change,
        block or unblock since (each increments credentials_version)."""
        return (
            now < self.expires_at
            and not self.user.blocked
            and self.credentials_version == self.user.credentials_version
        )


@dataclass(frozen=True)
class RefreshToken:
    user_id: int | None
    personal_access_token_id: int | None
    deploy_token_id: int | None
    credentials_version: int
    client_id: str | None
    expires_at: int


def connect(db_path: Database) -> sqlite3.Connection:
    """A connection set up the way every user of the database needs it; a database that
    cannot be opened is one AuthError sentence, never a traceback."""
    if isinstance(db_path, PostgresDatabase):
        from appliance.auth import postgres

        return postgres.connect(db_path)  # type: ignore[return-value]: the same interface
    check_database_files(db_path)
    try:
        connection = sqlite3.connect(
            str(db_path), timeout=10.0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA busy_timeout = 10000")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as error:
        raise AuthError(
            f"The auth database {db_path} cannot be opened ({error}); check that it and"
            " the files beside it are readable and writable by this account."
        ) from error
    return connection


def ensure_schema(db_path: Database) -> int:
    """Create the database or bring it to the latest schema; a no-op when it is current.
    Returns how many migrations this call applied (0: another run did, or none due)."""
    if isinstance(db_path, PostgresDatabase):
        from appliance.auth import postgres

        return postgres.ensure_schema(db_path)
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if not db_path.exists():
        # Password hashes live here: readable by the service's user only.
        os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
    connection = connect(db_path)
    try:
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            applied = len(MIGRATIONS) - version
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number:d}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    finally:
        connection.close()
    return max(applied, 0)


def check_schema(db_path: Database) -> None:
    """Refuse to serve from a database that is missing or not at the latest schema."""
    if isinstance(db_path, PostgresDatabase):
        version = schema_version(db_path) or 0
        if version != len(MIGRATIONS):
            raise AuthError(
                f"The auth database {db_path} has schema version {version}, this service"
                f" needs {len(MIGRATIONS)}; run 'appliance-ctl reconfigure'."
            )
        return
    db_path = Path(db_path)
    if not db_path.exists():
        raise AuthError(
            f"The auth database {db_path} does not exist; run 'appliance-ctl reconfigure'."
        )
    connection = connect(db_path)
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise AuthError(f"The auth database {db_path} cannot be read: {error}.") from error
    finally:
        connection.close()
    if version != len(MIGRATIONS):
        raise AuthError(
            f"The auth database {db_path} has schema version {version}, this service needs"
            f" {len(MIGRATIONS)}; run 'appliance-ctl reconfigure'."
        )


def schema_version(db_path: Database) -> int | None:
    """The schema number the database has reached, None when there is no database yet.
    Opened read-only, so that asking (a dry run, the recipe's plan) creates nothing."""
    if isinstance(db_path, PostgresDatabase):
        from appliance.auth import postgres

        return postgres.schema_version(db_path)
    db_path = Path(db_path)
    check_database_files(db_path)  # a linked auth.db-wal: one sentence, never followed
    if not db_path.exists():
        return None
    try:
        connection = _read_only(db_path)
        try:
            return connection.execute("PRAGMA user_version").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error as error:  # not a database, damaged, unreadable: one sentence
        raise AuthError(
            f"The auth database {db_path} cannot be read: {error}; restore it from a backup"
            " (appliance-ctl restore)."
        ) from None


def user_exists(db_path: Database, username: str) -> bool:
    """Whether `username` has an account; False while there is no database or no users
    table yet (the recipe asks before its schema step has run). Read-only, like
    schema_version."""
    if isinstance(db_path, PostgresDatabase):
        from appliance.auth import postgres

        return bool(postgres.query(db_path, "SELECT 1 FROM users WHERE username = ?", (username,)))
    db_path = Path(db_path)
    if schema_version(db_path) is None:
        return False
    connection = _read_only(db_path)
    try:
        row = connection.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        return row is not None
    except sqlite3.OperationalError:  # no users table: schema 0
        return False
    finally:
        connection.close()


def project_quotas(db_path: Database) -> dict[str, int | None]:
    """Every project path with its quota (None: none), read-only, so that root reading it
    leaves no file behind; empty while there is no database yet."""
    if isinstance(db_path, PostgresDatabase):
        from appliance.auth import postgres

        return dict(postgres.query(db_path, "SELECT path, quota_bytes FROM projects"))
    db_path = Path(db_path)
    if schema_version(db_path) is None:
        return {}
    connection = _read_only(db_path)
    try:
        return dict(connection.execute("SELECT path, quota_bytes FROM projects").fetchall())
    except sqlite3.OperationalError:  # an older schema: run reconfigure
        return {}
    finally:
        connection.close()


def _read_only(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)


def ensure_admin(db_path: Database, username: str, password: str) -> bool:
    """Create the administrator if missing (True); never touches an existing user."""
    from appliance.auth import credentials  # argon2: see the module docstring

    store = Store(db_path)
    try:
        if store.find_user(username) is not None:
            return False
        try:
            store.create_user(username, credentials.hash_password(password), admin=True)
        except AlreadyExistsError:  # created meanwhile by a concurrent run
            return False
        return True
    finally:
        store.close()


@contextmanager
def admin_store(db_path: Database) -> Iterator[Store]:
    """The Store for a command that runs as root beside the service (retention, tag
    list): closed after, and any WAL or shared-memory file it made left owned as the
    SQLite database is, so the service's account can still open them."""
    store = Store(db_path)
    try:
        yield store
    finally:
        store.close()
        if not isinstance(db_path, PostgresDatabase):
            owner = os.lstat(db_path)
            chown_database_files(Path(db_path), owner.st_uid, owner.st_gid)


class Store:
    """All reads and writes of users, projects, memberships, tokens and sign-in failures."""

    def __init__(self, db_path: Database | str) -> None:
        self.db_path: Database = db_path if isinstance(db_path, PostgresDatabase) else Path(db_path)
        self._local = threading.local()
        self._integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
        if isinstance(self.db_path, PostgresDatabase):
            from appliance.auth import postgres

            self._integrity_errors = (sqlite3.IntegrityError, postgres.IntegrityError)

    # -- connection handling -------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use in this process (a connection
        never crosses a fork); a PostgreSQL connection the server dropped (a restart, a
        failover) is opened again at the next request."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or getattr(local.connection, "broken", False):
            local.connection = connect(self.db_path)
            local.pid = os.getpid()
        return local.connection

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.close()
        self._local = threading.local()

    def _write(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        try:
            return self._db().execute(sql, tuple(params))
        except self._integrity_errors as error:
            raise _IntegrityProblem(str(error)) from error

    def _one(self, sql: str, params: Iterable = ()) -> tuple | None:
        return self._db().execute(sql, tuple(params)).fetchone()

    def _all(self, sql: str, params: Iterable = ()) -> list[tuple]:
        return self._db().execute(sql, tuple(params)).fetchall()

    def ping(self) -> None:
        self._one("SELECT 1")

    def shared_maintenance_window(self) -> Window | None:
        """The maintenance window a run on any node opened (appliance/auth/cluster.py),
        None when there is none, its run is gone, or the store is SQLite (one host: the
        marker file says it)."""
        if not isinstance(self.db_path, PostgresDatabase):
            return None
        from appliance.auth.cluster import read_window

        return read_window(self._db())

    # -- users -----------------------------------------------------------------------
    _USER_COLUMNS = "id, username, password_hash, admin, blocked, credentials_version, created_at"

    def find_user(self, username: str) -> User | None:
        row = self._one(f"SELECT {self._USER_COLUMNS} FROM users WHERE username = ?", (username,))
        return _user(row) if row else None

    def find_user_by_id(self, user_id: int) -> User | None:
        row = self._one(f"SELECT {self._USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return _user(row) if row else None

    def user(self, username: str) -> User:
        found = self.find_user(username)
        if found is None:
            raise NotFoundError(f"There is no user named '{username}'.")
        return found

    def list_users(self) -> list[User]:
        rows = self._all(f"SELECT {self._USER_COLUMNS} FROM users ORDER BY username")
        return [_user(row) for row in rows]

    def create_user(self, username: str, password_hash: str, admin: bool = False) -> User:
        validate_username(username)
        # A user owns the namespace of its name: it must not take over a group's projects.
        group_project = self._one(
            "SELECT path FROM projects WHERE substr(path, 1, ?) = ? LIMIT 1",
            (len(username) + 1, username + "/"),
        )
        if group_project:
            raise AlreadyExistsError(
                f"The namespace '{username}' is used by project '{group_project[0]}';"
                " choose another username."
            )
        try:
            self._write(
                "INSERT INTO users (username, password_hash, admin, created_at)"
                " VALUES (?, ?, ?, ?)",
                (username, password_hash, int(admin), int(time.time())),
            )
        except _IntegrityProblem as error:
            raise AlreadyExistsError(f"A user named '{username}' exists already.") from error
        return self.user(username)

    def delete_user(self, username: str) -> None:
        if self._write("DELETE FROM users WHERE username = ?", (username,)).rowcount == 0:
            raise NotFoundError(f"There is no user named '{username}'.")

    def set_password_hash(self, username: str, password_hash: str) -> None:
        """Also invalidates cached credentials and refresh tokens on every worker."""
        self._update_user(
            username,
            "password_hash = ?, credentials_version = credentials_version + 1",
            (password_hash,),
        )

    def set_blocked(self, username: str, blocked: bool) -> None:
        self._update_user(
            username, "blocked = ?, credentials_version = credentials_version + 1", (int(blocked),)
        )

    def set_admin(self, username: str, admin: bool) -> None:
        self._update_user(
            username, "admin = ?, credentials_version = credentials_version + 1", (int(admin),)
        )

    def _update_user(self, username: str, assignments: str, params: tuple) -> None:
        cursor = self._write(
            f"UPDATE users SET {assignments} WHERE username = ?", (*params, username)
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"There is no user named '{username}'.")

    # -- projects --------------------------------------------------------------------
    _PROJECT_COLUMNS = "id, path, visibility, registry_enabled, created_at, quota_bytes"

    def create_project(self, path: str, visibility: str, registry_enabled: bool) -> Project:
        validate_project_path(path)
        _check_choice("visibility", visibility, VISIBILITIES)
        try:
            self._write(
                "INSERT INTO projects (path, visibility, registry_enabled, created_at)"
                " VALUES (?, ?, ?, ?)",
                (path, visibility, int(registry_enabled), int(time.time())),
            )
        except _IntegrityProblem as error:
            raise AlreadyExistsError(f"A project '{path}' exists already.") from error
        return self.project(path)

    def find_project(self, path: str) -> Project | None:
        row = self._one(f"SELECT {self._PROJECT_COLUMNS} FROM projects WHERE path = ?", (path,))
        return _project(row) if row else None

    def project(self, path: str) -> Project:
        found = self.find_project(path)
        if found is None:
            raise NotFoundError(f"There is no project '{path}'.")
        return found

    def list_projects(self) -> list[Project]:
        rows = self._all(f"SELECT {self._PROJECT_COLUMNS} FROM projects ORDER BY path")
        return [_project(row) for row in rows]

    def update_project(
        self, path: str, visibility: str | None = None, registry_enabled: bool | None = None
    ) -> Project:
        project = self.project(path)
        if visibility is not None:
            _check_choice("visibility", visibility, VISIBILITIES)
        self._write(
            "UPDATE projects SET visibility = ?, registry_enabled = ? WHERE id = ?",
            (
                visibility or project.visibility,
                int(project.registry_enabled if registry_enabled is None else registry_enabled),
                project.id,
            ),
        )
        return self.project(path)

    def set_quota(self, path: str, quota_bytes: int | None) -> Project:
        project = self.project(path)
        self._write("UPDATE projects SET quota_bytes = ? WHERE id = ?", (quota_bytes, project.id))
        return self.project(path)

    def quotas(self) -> dict[str, int]:
        rows = self._all("SELECT path, quota_bytes FROM projects WHERE quota_bytes IS NOT NULL")
        return {path: quota for path, quota in rows}

    def project_path_of(self, repository: str) -> str:
        """The project a repository's bytes count against (names.owning_project)."""
        prefixes = path_prefixes(repository)
        marks = ", ".join("?" * len(prefixes))
        row = self._one(
            f"SELECT path FROM projects WHERE path IN ({marks}) ORDER BY length(path) DESC LIMIT 1",
            prefixes,
        )
        return row[0] if row else repository.split("/", 1)[0]

    def delete_project(self, path: str) -> None:
        if self._write("DELETE FROM projects WHERE path = ?", (path,)).rowcount == 0:
            raise NotFoundError(f"There is no project '{path}'.")

    def project_access(
        self,
        repository: str,
        user_id: int | None,
        username: str | None,
        default_registry_enabled: bool,
    ) -> ProjectAccess | None:
        """The project owning `repository` (longest existing path prefix) and the asker's role.

        A repository in a user's personal namespace (`alice/...`) without a project of its
        own belongs to a private personal project owned by that user.
        """
        prefixes = path_prefixes(repository)
        marks = ", ".join("?" * len(prefixes))
        row = self._one(
            "SELECT p.id, p.path, p.visibility, p.registry_enabled, m.role, p.quota_bytes"
            " FROM projects p LEFT JOIN memberships m ON m.project_id = p.id AND m.user_id = ?"
            f" WHERE p.path IN ({marks}) ORDER BY length(p.path) DESC LIMIT 1",
            (user_id, *prefixes),
        )
        namespace = repository.split("/", 1)[0]
        owns_namespace = username is not None and namespace == username
        if row is None:
            if owns_namespace or self.find_user(namespace) is not None:
                return ProjectAccess(
                    path=namespace,
                    visibility="private",
                    registry_enabled=default_registry_enabled,
                    role="owner" if owns_namespace else None,
                )
            return None
        project_id, path, visibility, registry_enabled, role, quota_bytes = row
        if owns_namespace:
            role = "owner"
        return ProjectAccess(
            path=path,
            visibility=visibility,
            registry_enabled=bool(registry_enabled),
            role=role,
            project_id=project_id,
            quota_bytes=quota_bytes,
        )

    # -- tag rules -------------------------------------------------------------------
    def set_tag_rules(self, path: str, kind: str, rules: Iterable[TagRule]) -> None:
        """Replace the project's rules of one kind (immutable or protected) at once."""
        project = self.project(path)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM tag_rules WHERE project_id = ? AND kind = ?", (project.id, kind)
            )
            for position, rule in enumerate(rules):
                db.execute(
                    "INSERT INTO tag_rules (project_id, kind, pattern, role, position)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (project.id, kind, rule.pattern, rule.role, position),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def tag_rules(self, project_id: int) -> list[TagRule]:
        """A project's rules, immutable first, each kind in the order it was given."""
        rows = self._all(
            "SELECT kind, pattern, role FROM tag_rules WHERE project_id = ?"
            " ORDER BY kind, position",
            (project_id,),
        )
        return [TagRule(kind, pattern, role) for kind, pattern, role in rows]

    def reservation(self, repository: str, tag: str) -> Reservation | None:
        row = self._one(
            "SELECT digest, reserved_at FROM tag_reservations WHERE repository = ? AND tag = ?",
            (repository, tag),
        )
        return Reservation(*row) if row else None

    def reserve_tag(
        self,
        repository: str,
        tag: str,
        digest: str,
        now: float,
        previous: Reservation | None,
    ) -> bool:
        """Reserve an immutable tag for the push of `digest`: True if this push holds it.

        With no `previous` reservation it is an INSERT, which the unique key lets only one
        of two concurrent pushes make; over a stale one (a push that never stored its
        manifest) an UPDATE of exactly the row that was read, for the same reason. The
        same digest again only refreshes the time."""
        if previous is None:
            try:
                self._write(
                    "INSERT INTO tag_reservations (repository, tag, digest, reserved_at)"
                    " VALUES (?, ?, ?, ?)",
                    (repository, tag, digest, now),
                )
                return True
            except _IntegrityProblem:
                held = self.reservation(repository, tag)
                return held is not None and held.digest == digest
        cursor = self._write(
            "UPDATE tag_reservations SET digest = ?, reserved_at = ?"
            " WHERE repository = ? AND tag = ? AND digest = ? AND reserved_at = ?",
            (digest, now, repository, tag, previous.digest, previous.reserved_at),
        )
        if cursor.rowcount == 1:
            return True
        held = self.reservation(repository, tag)
        return held is not None and held.digest == digest

    def record_tag(self, repository: str, tag: str, digest: str, now: float) -> None:
        """What the registry holds under an immutable tag, seen there: the reservation
        follows it (a tag pushed before its rule existed, or moved behind our back)."""
        self._write(
            "INSERT INTO tag_reservations (repository, tag, digest, reserved_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (repository, tag) DO UPDATE SET"
            " digest = excluded.digest, reserved_at = excluded.reserved_at"
            " WHERE tag_reservations.digest != excluded.digest",
            (repository, tag, digest, now),
        )

    # -- memberships -----------------------------------------------------------------
    def add_member(self, path: str, username: str, role: str) -> None:
        """Add a member, or change the role of an existing one."""
        _check_choice("role", role, ROLES)
        project, user = self.project(path), self.user(username)
        self._write(
            "INSERT INTO memberships (project_id, user_id, role) VALUES (?, ?, ?)"
            " ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
            (project.id, user.id, role),
        )

    def remove_member(self, path: str, username: str) -> None:
        project, user = self.project(path), self.user(username)
        cursor = self._write(
            "DELETE FROM memberships WHERE project_id = ? AND user_id = ?", (project.id, user.id)
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"User '{username}' is not a member of project '{path}'.")

    def roles_of(self, user_id: int) -> dict[str, str]:
        """Every project path where the user is a member, with its role (one query: the
        project list of the admin API and the pages)."""
        rows = self._all(
            "SELECT p.path, m.role FROM memberships m JOIN projects p ON p.id = m.project_id"
            " WHERE m.user_id = ?",
            (user_id,),
        )
        return dict(rows)

    def list_members(self, path: str) -> list[Member]:
        project = self.project(path)
        rows = self._all(
            "SELECT u.username, m.role FROM memberships m JOIN users u ON u.id = m.user_id"
            " WHERE m.project_id = ? ORDER BY u.username",
            (project.id,),
        )
        return [Member(username, role) for username, role in rows]

    # -- personal access tokens ------------------------------------------------------
    _PAT_COLUMNS = "id, user_id, name, scopes, expires_at, revoked, created_at"

    def create_personal_access_token(
        self, username: str, name: str, scopes: Iterable[str], expires_at: int | None
    ) -> tuple[PersonalAccessToken, str]:
        """Returns the token and its secret; only the secret's digest is stored."""
        from appliance.auth import credentials  # argon2: see the module docstring

        user = self.user(username)
        scope_text = _scope_text(scopes, PERSONAL_TOKEN_SCOPES)
        secret = credentials.new_secret(credentials.PERSONAL_TOKEN_PREFIX)
        cursor = self._write(
            "INSERT INTO personal_access_tokens"
            " (user_id, name, token_digest, scopes, expires_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (
                user.id,
                name,
                credentials.secret_digest(secret),
                scope_text,
                expires_at,
                int(time.time()),
            ),
        )
        return self.personal_access_token(cursor.fetchall()[0][0]), secret

    def personal_access_token(self, token_id: int) -> PersonalAccessToken:
        row = self._one(
            f"SELECT {self._PAT_COLUMNS} FROM personal_access_tokens WHERE id = ?", (token_id,)
        )
        if row is None:
            raise NotFoundError(f"There is no personal access token {token_id}.")
        return _pat(row)

    def find_personal_access_token(self, digest: str) -> PersonalAccessToken | None:
        row = self._one(
            f"SELECT {self._PAT_COLUMNS} FROM personal_access_tokens WHERE token_digest = ?",
            (digest,),
        )
        return _pat(row) if row else None

    def list_personal_access_tokens(self, username: str) -> list[PersonalAccessToken]:
        user = self.user(username)
        rows = self._all(
            f"SELECT {self._PAT_COLUMNS} FROM personal_access_tokens WHERE user_id = ? ORDER BY id",
            (user.id,),
        )
        return [_pat(row) for row in rows]

    def revoke_personal_access_token(self, username: str, token_id: int) -> None:
        user = self.user(username)
        cursor = self._write(
            "UPDATE personal_access_tokens SET revoked = 1 WHERE id = ? AND user_id = ?",
            (token_id, user.id),
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"User '{username}' has no personal access token {token_id}.")

    # -- deploy tokens ---------------------------------------------------------------
    _DEPLOY_COLUMNS = (
        "d.id, d.project_id, p.path, d.name, d.username, d.scopes, d.expires_at, d.revoked,"
        " d.created_at"
    )

    def create_deploy_token(
        self, path: str, name: str, scopes: Iterable[str], expires_at: int | None
    ) -> tuple[DeployToken, str]:
        from appliance.auth import credentials  # argon2: see the module docstring

        project = self.project(path)
        scope_text = _scope_text(scopes)
        secret = credentials.new_secret(credentials.DEPLOY_TOKEN_PREFIX)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            cursor = db.execute(
                "INSERT INTO deploy_tokens"
                " (project_id, name, token_digest, scopes, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    project.id,
                    name,
                    credentials.secret_digest(secret),
                    scope_text,
                    expires_at,
                    int(time.time()),
                ),
            )
            token_id = cursor.fetchall()[0][0]
            db.execute(
                "UPDATE deploy_tokens SET username = ? WHERE id = ?",
                (DEPLOY_TOKEN_USERNAME.format(id=token_id), token_id),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self._deploy_token_where("d.id = ?", token_id), secret

    def _deploy_token_where(self, condition: str, value: object) -> DeployToken:
        found = self._find_deploy_token(condition, value)
        if found is None:
            raise NotFoundError("There is no such deploy token.")
        return found

    def _find_deploy_token(self, condition: str, value: object) -> DeployToken | None:
        row = self._one(
            f"SELECT {self._DEPLOY_COLUMNS} FROM deploy_tokens d"
            f" JOIN projects p ON p.id = d.project_id WHERE {condition}",
            (value,),
        )
        return _deploy(row) if row else None

    def find_deploy_token(self, username: str) -> tuple[DeployToken, str] | None:
        """The deploy token signing in as `username`, with its stored digest."""
        row = self._one(
            f"SELECT {self._DEPLOY_COLUMNS}, d.token_digest FROM deploy_tokens d"
            " JOIN projects p ON p.id = d.project_id WHERE d.username = ?",
            (username,),
        )
        return (_deploy(row[:-1]), row[-1]) if row else None

    def find_deploy_token_by_id(self, token_id: int) -> DeployToken | None:
        return self._find_deploy_token("d.id = ?", token_id)

    def list_deploy_tokens(self, path: str) -> list[DeployToken]:
        project = self.project(path)
        rows = self._all(
            f"SELECT {self._DEPLOY_COLUMNS} FROM deploy_tokens d"
            " JOIN projects p ON p.id = d.project_id WHERE d.project_id = ? ORDER BY d.id",
            (project.id,),
        )
        return [_deploy(row) for row in rows]

    def revoke_deploy_token(self, path: str, token_id: int) -> None:
        project = self.project(path)
        cursor = self._write(
            "UPDATE deploy_tokens SET revoked = 1 WHERE id = ? AND project_id = ?",
            (token_id, project.id),
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"Project '{path}' has no deploy token {token_id}.")

    # -- refresh tokens --------------------------------------------------------------
    def store_refresh_token(
        self,
        digest: str,
        *,
        user_id: int | None,
        personal_access_token_id: int | None,
        deploy_token_id: int | None,
        credentials_version: int,
        client_id: str | None,
        expires_at: int,
        keep: int = 0,
    ) -> None:
        """Store one refresh token; with `keep`, the owner's (user's or deploy token's)
        oldest live tokens beyond that number are dropped, so repeated offline logins
        cannot grow the database without bound."""
        now = int(time.time())
        self._write(
            "INSERT INTO refresh_tokens (token_digest, user_id, personal_access_token_id,"
            " deploy_token_id, credentials_version, client_id, expires_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest,
                user_id,
                personal_access_token_id,
                deploy_token_id,
                credentials_version,
                client_id,
                expires_at,
                now,
            ),
        )
        # Keep the table from growing without bound: expired rows are useless.
        self._write("DELETE FROM refresh_tokens WHERE expires_at < ?", (now,))
        owner = (
            ("user_id", user_id) if user_id is not None else ("deploy_token_id", deploy_token_id)
        )
        if keep > 0 and owner[1] is not None:
            self._write(
                f"DELETE FROM refresh_tokens WHERE {owner[0]} = ? AND rowid NOT IN"
                f" (SELECT rowid FROM refresh_tokens WHERE {owner[0]} = ?"
                " ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                (owner[1], owner[1], keep),
            )

    def find_refresh_token(self, digest: str) -> RefreshToken | None:
        row = self._one(
            "SELECT user_id, personal_access_token_id, deploy_token_id, credentials_version,"
            " client_id, expires_at FROM refresh_tokens WHERE token_digest = ?",
            (digest,),
        )
        return RefreshToken(*row) if row else None

    # -- web sessions ----------------------------------------------------------------
    def create_web_session(
        self,
        digest: str,
        user: User,
        csrf_token: str,
        now: int,
        expires_at: int,
        keep: int = 0,
    ) -> None:
        """Store a signed-in page session (its secret's digest only), bound to the user's
        credentials_version; with `keep`, the user's oldest sessions beyond that number
        are dropped, and expired ones of everybody are forgotten."""
        self._write(
            "INSERT INTO web_sessions (token_digest, user_id, credentials_version, csrf_token,"
            " created_at, seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (digest, user.id, user.credentials_version, csrf_token, now, now, expires_at),
        )
        self._write("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
        if keep > 0:
            self._write(
                "DELETE FROM web_sessions WHERE user_id = ? AND token_digest NOT IN"
                " (SELECT token_digest FROM web_sessions WHERE user_id = ?"
                " ORDER BY created_at DESC, token_digest LIMIT ?)",
                (user.id, user.id, keep),
            )

    def find_web_session(self, digest: str) -> WebSession | None:
        """The session with its user's current row; the caller decides whether it still
        counts (WebSession.live)."""
        user_columns = [f"u.{c}" for c in self._USER_COLUMNS.split(", ")]
        row = self._one(
            "SELECT s.token_digest, s.credentials_version, s.csrf_token, s.notice,"
            " s.created_at, s.seen_at, s.expires_at, u.display_name,"
            f" {', '.join(user_columns)}"
            " FROM web_sessions s JOIN users u ON u.id = s.user_id WHERE s.token_digest = ?",
            (digest,),
        )
        if row is None:
            return None
        return WebSession(*row[:7], user=_user(row[8:]), display_name=row[7])

    def touch_web_session(self, digest: str, seen_at: int, expires_at: int) -> None:
        self._write(
            "UPDATE web_sessions SET seen_at = ?, expires_at = ? WHERE token_digest = ?",
            (seen_at, expires_at, digest),
        )

    def set_web_session_notice(self, digest: str, notice: str | None) -> None:
        self._write("UPDATE web_sessions SET notice = ? WHERE token_digest = ?", (notice, digest))

    def delete_web_session(self, digest: str) -> None:
        self._write("DELETE FROM web_sessions WHERE token_digest = ?", (digest,))

    # -- free text the pages show: display names, descriptions --------------------------
    def display_names(self) -> dict[str, str]:
        """username -> display name, for the users that have one."""
        rows = self._all("SELECT username, display_name FROM users WHERE display_name != ''")
        return dict(rows)

    def set_display_name(self, username: str, display_name: str) -> None:
        self._update_user(username, "display_name = ?", (_free_text(display_name, 200),))

    def project_descriptions(self) -> dict[str, str]:
        """project path -> description, for the projects that have one."""
        rows = self._all("SELECT path, description FROM projects WHERE description != ''")
        return dict(rows)

    def set_project_description(self, path: str, description: str) -> None:
        project = self.project(path)
        self._write(
            "UPDATE projects SET description = ? WHERE id = ?",
            (_free_text(description, 2000), project.id),
        )

    # -- failed sign-ins -------------------------------------------------------------
    def record_failed_signin(self, subjects: Iterable[str], now: int, window: int) -> None:
        """Count one failure for each subject ('user:alice', 'address:10.0.0.1')."""
        for subject in subjects:
            self._write(
                "INSERT INTO failed_signins (subject, window_start, failures) VALUES (?, ?, 1)"
                " ON CONFLICT (subject) DO UPDATE SET failures = CASE"
                " WHEN failed_signins.window_start <= ? THEN 1"
                " ELSE failed_signins.failures + 1 END,"
                " window_start = CASE WHEN failed_signins.window_start <= ?"
                " THEN excluded.window_start ELSE failed_signins.window_start END",
                (subject, now, now - window, now - window),
            )

    def failed_signins(self, subjects: Iterable[str], now: int, window: int) -> dict[str, tuple]:
        """Failures and window start per subject, counting only the current window."""
        subjects = list(subjects)
        marks = ", ".join("?" * len(subjects))
        rows = self._all(
            "SELECT subject, failures, window_start FROM failed_signins"
            f" WHERE subject IN ({marks}) AND window_start > ?",
            (*subjects, now - window),
        )
        return {subject: (failures, start) for subject, failures, start in rows}

    def forget_failed_signins(self, before: int) -> None:
        self._write("DELETE FROM failed_signins WHERE window_start < ?", (before,))

    # -- the registry's events ----------------------------------------------------------
    def record_events(self, events: Iterable[RegistryEvent]) -> int:
        """Record manifest events (a redelivered event, same id, once); keep the last
        HISTORY_KEPT per repository and kind. Returns how many were new."""
        events = list(events)
        if not events:
            return 0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            new = 0
            for e in events:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO registry_events (event_id, action, repository, tag,"
                    " digest, media_type, size, actor, address, user_agent, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        e.event_id,
                        e.action,
                        e.repository,
                        e.tag,
                        e.digest,
                        e.media_type,
                        e.size,
                        e.actor,
                        e.address,
                        e.user_agent,
                        e.at,
                    ),
                )
                new += cursor.rowcount
            for repository, pulls in {(e.repository, e.action == "pull") for e in events}:
                kinds = "('pull')" if pulls else "('push', 'delete')"
                db.execute(
                    f"DELETE FROM registry_events WHERE repository = ? AND action IN {kinds}"
                    " AND id <= (SELECT id FROM registry_events WHERE repository = ?"
                    f" AND action IN {kinds} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (repository, repository, HISTORY_KEPT),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new

    def event_counts(self) -> dict[str, int]:
        rows = self._all("SELECT action, COUNT(*) FROM registry_events GROUP BY action")
        return {action: count for action, count in rows}

    def history(
        self, repository: str | None = None, action: str | None = None, limit: int = 100
    ) -> list[RegistryEvent]:
        """The newest events first, of one repository (or a project: every repository
        under the path) and one action, or all."""
        conditions, params = [], []
        if repository is not None:
            conditions.append("(repository = ? OR substr(repository, 1, ?) = ?)")
            params += [repository, len(repository) + 1, repository + "/"]
        if action is not None:
            conditions.append("action = ?")
            params.append(action)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._all(
            "SELECT event_id, action, repository, tag, digest, media_type, size, actor,"
            f" address, user_agent, at FROM registry_events{where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [RegistryEvent(*row) for row in rows]

    def manifest_changes(
        self, repository: str, after: int
    ) -> list[tuple[int, str, str | None, str | None]]:
        """(id, action, tag, digest) of the pushes and deletes recorded for exactly this
        repository after event row `after`, oldest first: what the admin API applies to
        the tags it listed before (registry_content.RegistryContentOverAPI)."""
        rows = self._all(
            "SELECT id, action, tag, digest FROM registry_events WHERE repository = ?"
            " AND action IN ('push', 'delete') AND id > ? ORDER BY id",
            (repository, after),
        )
        return [tuple(row) for row in rows]

    def last_event_id(self) -> int:
        row = self._one("SELECT MAX(id) FROM registry_events")
        return int(row[0] or 0) if row else 0

    def tag_events(self, repository: str) -> list[RegistryEvent]:
        """Every push and pull kept for exactly this repository, oldest first (what
        retention reads: at most HISTORY_KEPT of each kind)."""
        rows = self._all(
            "SELECT event_id, action, repository, tag, digest, media_type, size, actor,"
            " address, user_agent, at FROM registry_events"
            " WHERE repository = ? AND action IN ('push', 'pull') ORDER BY id",
            (repository,),
        )
        return [RegistryEvent(*row) for row in rows]

    # -- retention policies (appliance/retention.py) -------------------------------------
    def set_retention_policy(self, path: str, policy: Policy | None) -> None:
        """Set (or, with None, remove) the project's retention policy."""
        project = self.project(path)
        if policy is None:
            self._write("DELETE FROM retention_policies WHERE project_id = ?", (project.id,))
            return
        self._write(
            "INSERT INTO retention_policies (project_id, keep_last, keep_patterns,"
            " older_than_seconds, pulled_within_seconds, max_delete, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project_id) DO UPDATE SET"
            " keep_last = excluded.keep_last, keep_patterns = excluded.keep_patterns,"
            " older_than_seconds = excluded.older_than_seconds,"
            " pulled_within_seconds = excluded.pulled_within_seconds,"
            " max_delete = excluded.max_delete, updated_at = excluded.updated_at",
            (
                project.id,
                policy.keep_last,
                json.dumps(list(policy.keep)),
                policy.older_than,
                policy.pulled_within,
                policy.max_delete,
                int(time.time()),
            ),
        )

    def retention_policies(self) -> dict[str, Policy]:
        """Every project's policy, by project path."""
        from appliance.retention import Policy

        rows = self._all(
            "SELECT p.path, r.keep_last, r.keep_patterns, r.older_than_seconds,"
            " r.pulled_within_seconds, r.max_delete FROM retention_policies r"
            " JOIN projects p ON p.id = r.project_id ORDER BY p.path"
        )
        return {
            path: Policy(keep_last, tuple(json.loads(keep)), older, pulled, max_delete)
            for path, keep_last, keep, older, pulled, max_delete in rows
        }

    # -- usage brought by pushes since the figures were computed ----------------------------
    def add_pending_usage(self, blobs: Iterable[tuple[str, str, int]], now: float) -> None:
        """Blobs (project, digest, size) a push or mount brought: each digest counts once
        per project until the next computation from storage (`appliance-ctl usage`)."""
        for project, digest, size in blobs:
            self._write(
                "INSERT INTO usage_pending (project, digest, size, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (project, digest) DO UPDATE SET at = excluded.at",
                (project, digest, size, now),
            )

    def pending_usage(self, since: float) -> dict[str, int]:
        """Bytes per project pushed since `since` (the figures' computation time)."""
        rows = self._all(
            "SELECT project, SUM(size) FROM usage_pending WHERE at >= ? GROUP BY project",
            (since,),
        )
        return {project: int(total) for project, total in rows}

    def forget_pending_usage(self, before: float) -> None:
        self._write("DELETE FROM usage_pending WHERE at < ?", (before,))


class _IntegrityProblem(Exception):
    pass


def _check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidValueError(
            f"'{value}' is not a valid {what}; choose one of: {', '.join(choices)}."
        )


def _free_text(text: str, limit: int) -> str:
    """A display name or description as stored: one bounded piece of text, no control
    characters (a newline is allowed in a description). The pages escape it."""
    text = text.strip()
    if len(text) > limit:
        raise InvalidValueError(f"The text is {len(text)} characters long; use at most {limit}.")
    if any(ord(c) < 32 and c not in "\n\r\t" for c in text):
        raise InvalidValueError("The text holds control characters; remove them.")
    return text


def _scope_text(scopes: Iterable[str], allowed: tuple[str, ...] = TOKEN_SCOPES) -> str:
    scopes = sorted(set(scopes))
    if not scopes:
        raise InvalidValueError(f"A token needs at least one scope: {' or '.join(allowed)}.")
    for scope in scopes:
        _check_choice("token scope", scope, allowed)
    return " ".join(scopes)


def _user(row: tuple) -> User:
    id_, username, password_hash, admin, blocked, version, created = row
    return User(id_, username, password_hash, bool(admin), bool(blocked), version, created)


def _project(row: tuple) -> Project:
    id_, path, visibility, enabled, created, quota = row
    return Project(id_, path, visibility, bool(enabled), created, quota)


def _pat(row: tuple) -> PersonalAccessToken:
    id_, user_id, name, scopes, expires_at, revoked, created = row
    return PersonalAccessToken(
        id_, user_id, name, frozenset(scopes.split()), expires_at, bool(revoked), created
    )


def _deploy(row: tuple) -> DeployToken:
    id_, project_id, path, name, username, scopes, expires_at, revoked, created = row
    return DeployToken(
        id_,
        project_id,
        path,
        name,
        username,
        frozenset(scopes.split()),
        expires_at,
        bool(revoked),
        created,
    )
