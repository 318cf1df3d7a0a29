"""What the token service gets: its signing key and certificate, config, database,
the initial admin, and its supervised program.

The signing key is readable by the auth account alone. The key, its certificate and
the registry's rootcertbundle all come from the same secrets entry in one run, so the
service never signs with a key the registry does not trust; a key rotation
(recipes/rotation.py) writes the same files in two steps, the registry's bundle first.
"""

from __future__ import annotations

import hashlib
import json
import secrets as random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from appliance.auth.config import AuthConfig
from appliance.auth.database import Database, PostgresDatabase, read_password
from appliance.auth.database_files import chown_database_files
from appliance.auth.store import schema_version, user_exists
from appliance.contracts import Service, signal
from appliance.engine import Report
from appliance.pipeline import hold_point
from appliance.resources import (
    Change,
    Directory,
    File,
    Notify,
    Resource,
    atomic_write,
    reload,
    restart,
)
from appliance.secrets import Secrets
from appliance.settings import Settings, registry_address
from recipes import supervisor
from recipes.base import service_user

ADMIN_USERNAME = "root"


def _chown_database(db_path: Database, owner: str | None) -> None:
    if owner is None or isinstance(db_path, PostgresDatabase):
        return
    import pwd

    entry = pwd.getpwnam(owner)
    chown_database_files(db_path, entry.pw_uid, entry.pw_gid)


@dataclass
class AuthDatabase(Resource):
    """The SQLite file at the latest schema version, owned by the auth account; or the
    PostgreSQL database at the latest schema (several nodes: the first one migrates,
    under an advisory lock, and the others find it current)."""

    path: Database
    owner: str | None = None
    kind: ClassVar[str] = "database"

    @property
    def name(self) -> str:
        return str(self.path)

    def current(self) -> int | None:
        return schema_version(self.path)

    def plan(self, current: int | None) -> list[Change]:
        from appliance.auth.migrations import MIGRATIONS

        if current is None:
            return [Change("create")]
        if current < len(MIGRATIONS):
            return [Change(f"migrate schema {current} -> {len(MIGRATIONS)}")]
        return []

    def apply(self) -> None:
        from appliance.auth.store import ensure_schema

        hold_point("auth-schema")  # the tests meet two nodes' migrations here
        ensure_schema(self.path)
        _chown_database(self.path, self.owner)


@dataclass
class AdminUser(Resource):
    """The admin account `root`, created once; its password is never changed here.

    With no initial_root_password set, a generated one is written (0600) to a file the
    admin reads once, as Omnibus GitLab does; an existing admin is left alone.
    """

    db_path: Database
    password: str | None
    password_file: Path
    owner: str | None = None
    kind: ClassVar[str] = "user"

    @property
    def name(self) -> str:
        return ADMIN_USERNAME

    def current(self) -> bool:
        return user_exists(self.db_path, ADMIN_USERNAME)

    def plan(self, current: bool) -> list[Change]:
        if current:
            return []
        source = (
            "initial_root_password"
            if self.password
            else f"a generated password written to {self.password_file}"
        )
        return [Change(f"create admin with {source}")]

    def apply(self) -> None:
        from appliance.auth.store import ensure_admin

        password = self.password
        if not password:
            if self.password_file.exists():
                password = self.password_file.read_text().strip()
            else:
                password = random.token_urlsafe(18)
                atomic_write(self.password_file, (password + "\n").encode(), 0o600)
        ensure_admin(self.db_path, ADMIN_USERNAME, password)
        _chown_database(self.db_path, self.owner)


@dataclass
class GroupMember(Resource):
    """An account added to a group (never removed here): what lets the auth service
    reach the registry's socket, whose directory admits the web server's group only.

    supervisord gives a program its account's groups when it starts it, so a new
    membership restarts the service (a HUP keeps gunicorn's master, and its groups)."""

    username: str
    group: str
    notifies: tuple[Notify, ...] = ()
    kind: ClassVar[str] = "group member"

    @property
    def name(self) -> str:
        return f"{self.username} in {self.group}"

    def current(self) -> bool:
        import grp
        import pwd

        try:
            entry = grp.getgrnam(self.group)
            primary = pwd.getpwnam(self.username).pw_gid
        except KeyError:
            return False  # not created yet (a dry run of a first reconfigure)
        return self.username in entry.gr_mem or primary == entry.gr_gid

    def plan(self, current: bool) -> list[Change]:
        return [] if current else [Change(f"add {self.username} to group {self.group}")]

    def apply(self) -> None:
        import subprocess

        from appliance.errors import ResourceError

        result = subprocess.run(
            ["usermod", "--append", "--groups", self.group, self.username],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ResourceError(
                f"usermod could not add {self.username} to group {self.group}:"
                f" {result.stderr.strip()}"
            )


def audit_dir(settings: Settings) -> Path:
    """The audit log's directory: the auth account's own, apart from `log/auth/`, which
    supervisord (root) writes into and the account therefore must not control."""
    return settings.paths.log_dir / "audit"


def address(settings: Settings) -> str:
    """Where the token service answers: its socket path (listen_network: unix) or
    listen_addr; also what reconfigure waits on and nginx's upstream names."""
    if settings.auth.listen_network == "unix":
        return str(settings.paths.auth_socket)
    return settings.auth.listen_addr


def events_url(settings: Settings) -> str:
    """Where the registry posts its events: the service's internal listener."""
    return f"http://{settings.auth.internal_addr}/-/registry-events"


def auth_config(settings: Settings, secrets: Secrets) -> AuthConfig:
    """The token service's whole config, every field from the settings (AuthConfig has
    no defaults of its own that could disagree with them), and the digest of the
    registry's events secret from the secrets file."""
    a = settings.auth
    return AuthConfig(
        database=service_database(settings),
        database_password_file=str(service_password_file(settings) or ""),
        signing_key=Path(settings.registry.key_path),
        signing_certificate=settings.paths.token_signing_certificate,
        issuer=settings.registry.issuer,
        service=settings.registry.service,
        realm=settings.token_realm,
        audit_log=audit_dir(settings) / "audit.log",
        listen_addr=address(settings),
        workers=a.workers,
        threads=a.threads,
        token_lifetime=a.token_lifetime,
        refresh_token_lifetime=a.refresh_token_lifetime,
        # On the socket every peer is nginx (no other account may connect), and the
        # service believes its X-Real-IP. Over TCP any local process may connect and
        # claim any address, so the peer address is all the service believes.
        trusted_proxies=(),
        rate_limit_window=a.failed_login_window,
        rate_limit_user_failures=a.max_failed_logins,
        rate_limit_address_failures=a.max_failed_logins * 3,
        rate_limit_account_failures=a.max_failed_logins * 10,
        refresh_tokens_per_user=a.refresh_tokens_per_user,
        audit_log_max_bytes=settings.logging.max_bytes,
        audit_log_backups=settings.logging.backups,
        credential_cache_ttl=a.credential_cache_ttl,
        credential_cache_size=a.credential_cache_size,
        default_registry_enabled=settings.default_projects_features.container_registry,
        internal_addr=a.internal_addr,
        events_secret_digest=hashlib.sha256(secrets.registry_events_secret.encode()).hexdigest(),
        usage_file=settings.paths.registry_usage_file,
        gc_stats_file=settings.paths.registry_gc_file,
        registry_address=registry_address(settings) if settings.registry.enable else "",
        maintenance_file=settings.paths.registry_maintenance,
    )


def service_password_file(settings: Settings) -> Path | None:
    """The service's copy of the PostgreSQL password (the admin's file may be readable
    by root alone), None without database_url or password."""
    if settings.auth.database_url and settings.auth.database_password_file:
        return settings.paths.auth_dir / "database-password"
    return None


def service_database(settings: Settings) -> Database:
    """The database as the token service opens it: with its own password file."""
    if settings.auth.database_url:
        return PostgresDatabase(settings.auth.database_url, service_password_file(settings))
    return settings.auth_database


def database_password(settings: Settings, owner: str | None) -> list[Resource]:
    """The PostgreSQL password, copied from the admin's file for the service's account
    (0600, masked in every diff and log); nothing on SQLite."""
    copy = service_password_file(settings)
    if copy is None:
        return []
    password = read_password(Path(settings.auth.database_password_file or ""))
    return [
        File(
            copy,
            password + "\n",
            0o600,
            owner=owner,
            group=owner,
            sensitive=True,
            notifies=(reload("auth"),),
        )
    ]


def service(settings: Settings) -> Service:
    """gunicorn reloads its workers on HUP without dropping requests."""
    a, p = settings.auth, settings.paths
    bound = "auth.listen_network" if a.listen_network == "unix" else "auth.listen_addr"
    return Service(
        "auth",
        enabled=a.enable,
        reload=signal("HUP"),
        graceful_restart="HUP",
        ready=address(settings),
        binds={address(settings): bound, a.internal_addr: "auth.internal_addr"},
        user=service_user(settings, a.username),
        reaches=(p.auth_config, Path(settings.registry.key_path)),
        log=supervisor.service_log(settings, "auth"),
    )


def signing_key_file(settings: Settings, secrets: Secrets) -> File:
    """The key the service signs with, readable by its account alone."""
    user = service_user(settings, settings.auth.username)
    return File(
        Path(settings.registry.key_path),
        secrets.token_signing_key,
        0o600,
        owner=user,
        group=user,
        sensitive=True,
        notifies=(reload("auth"),),
    )


def signing_certificate_file(settings: Settings, secrets: Secrets) -> File:
    """Every certificate a registry must trust, the signing key's among them (the
    service picks its own key's to send as x5c). It is an external registry's
    rootcertbundle, and the tag rules verify tokens with it: during a key rotation a
    token of the previous (or next) key is one the registry accepts, so the rules must
    know its subject too, or its holder would pass a protected tag unchecked."""
    content = secrets.trusted_certificates()
    return File(
        settings.paths.token_signing_certificate, content, 0o644, notifies=(reload("auth"),)
    )


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    p = settings.paths
    user = service_user(settings, settings.auth.username)
    if not settings.auth.enable:
        return supervisor.disabled(settings, "auth")
    # A graceful reload (HUP) re-reads all three files: gunicorn's master builds the
    # application again and old workers finish their requests (appliance/auth/server.py).
    notify = (reload("auth"),)
    key_path = Path(settings.registry.key_path)
    umask = None
    socket_dir: list[Resource] = []
    if settings.auth.listen_network == "unix":
        # The socket's directory is the gate: only the auth account and the web
        # server's group may enter it, so nginx's workers may connect and no other local
        # account may even reach the socket (gunicorn makes the socket itself 0777).
        # umask 007: what the service writes (its audit log) is not world-readable.
        web_user = service_user(settings, settings.web_server.username)
        socket_dir = [Directory(p.auth_socket.parent, 0o2750, owner=user, group=web_user)]
        umask = "007"
    return [
        Directory(p.auth_dir, 0o750, owner=user, group=user),
        *socket_dir,
        # The service writes its audit log here itself; the admin group may read it.
        Directory(
            audit_dir(settings),
            0o750,
            owner=user,
            group=supervisor.LOG_READERS if settings.facts.run_as_root else None,
        ),
        # registry.key_path may name a directory of the admin's choosing: it must exist
        # and let the auth account through to its key.
        *([Directory(key_path.parent, 0o755)] if key_path.parent != p.auth_dir else []),
        signing_key_file(settings, secrets),
        signing_certificate_file(settings, secrets),
        File(
            p.auth_config,
            json.dumps(auth_config(settings, secrets).to_mapping(), indent=2) + "\n",
            0o640,
            owner=user,
            group=user,
            notifies=notify,
        ),
        # The tag rules ask the registry what a tag points at (appliance/auth/tag_gate.py);
        # on its socket, only the web server's group may connect. The account holds the
        # token-signing key already, so reaching the registry gives it no new power.
        *(
            [GroupMember(user, web_group, notifies=(restart("auth"),))]
            if user is not None
            and (web_group := service_user(settings, settings.web_server.username))
            and settings.registry.enable
            and settings.registry.listen_network == "unix"
            and settings.manage_accounts
            else []
        ),
        *database_password(settings, user),
        AuthDatabase(settings.auth_database, owner=user),
        AdminUser(
            settings.auth_database,
            settings.initial_root_password,
            p.initial_root_password_file,
            owner=user,
        ),
        *supervisor.program(
            settings,
            "auth",
            [supervisor.executable("appliance-auth"), "--config", str(p.auth_config)],
            user=user,
            stopsignal="TERM",
            umask=umask,
        ),
    ]


def messages(settings: Settings, report: Report) -> list[str]:
    if settings.auth.enable and not settings.registry.enable:
        return [
            f"Token service for an external registry: realm {settings.token_realm}, "
            f"service {settings.registry.service}, issuer {settings.registry.issuer}, "
            f"rootcertbundle {settings.paths.token_signing_certificate}."
        ]
    if not settings.registry.enable:
        return []
    address = (
        settings.registry_host
        if settings.registry_port == 443
        else f"{settings.registry_host}:{settings.registry_port}"
    )
    lines = [
        f"Registry: {settings.registry_external_url}  (docker login {address} -u {ADMIN_USERNAME})"
    ]
    password_file = settings.paths.initial_root_password_file
    if password_file.exists():
        lines.append(
            f"The password of {ADMIN_USERNAME} is in {password_file}; delete that "
            f"file once you have changed it (appliance-ctl user passwd "
            f"{ADMIN_USERNAME})."
        )
    return lines
