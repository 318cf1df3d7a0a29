"""The auth service's own configuration file (JSON), rendered by the reconfigure recipe.

The service reads nothing else: every knob is a field of AuthConfig, documented below, so
the recipe that writes the file and the server that reads it agree on one schema. The
fields have no defaults here: the recipe (`recipes/auth.auth_config`) sets every one
from the settings, whose defaults are the only ones, and a file missing a field (one
written by an older version, say) is refused with the field's name instead of being
filled with a value that could disagree with appliance.yml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.auth.database import Database, PostgresDatabase, database_of, url_problem
from appliance.errors import ConfigError


@dataclass(frozen=True)
class AuthConfig:
    """Every setting of the token service. Paths are absolute (already under the root)."""

    database: Database
    """Where users, projects, memberships and tokens live (shared by all workers): the
    SQLite file, or a PostgreSQL database (`postgresql://user@host:port/db` in the
    file), shared by several nodes."""
    database_password_file: str
    """The service's own copy (mode 0600) of the PostgreSQL password, '' for none (on
    SQLite always ''); folded into `database` when the file is read."""
    signing_key: Path
    """PEM private key that signs registry tokens: EC P-256 (ES256) or RSA (RS256)."""
    signing_certificate: Path
    """PEM certificate(s) of the signing key; may be the registry's whole rootcertbundle,
    in which case the FIRST certificate must be the one matching signing_key."""
    issuer: str
    """`iss` claim; must equal the registry's auth.token.issuer."""
    service: str
    """`aud` claim and the expected `service` parameter; the registry's auth.token.service."""
    realm: str
    """Public URL of the token endpoint (…/jwt/auth), sent in WWW-Authenticate challenges."""
    audit_log: Path
    """JSON-lines file receiving one record per grant or denial."""
    listen_addr: str
    """host:port the WSGI server binds, or the absolute path of a unix socket. On a socket
    every peer is nginx (only its account may connect) and its X-Real-IP is believed."""
    workers: int
    """Worker processes; one per core is the measured optimum (CPU-bound signing)."""
    threads: int
    """Threads per worker. They mostly hold nginx's idle keep-alive connections (the GIL
    serialises the work itself); keep-alive is what makes threads beat sync workers."""
    token_lifetime: int
    """Seconds a registry token stays valid (`expires_in`)."""
    refresh_token_lifetime: int
    """Seconds an OAuth2 refresh token (docker login's offline token) stays valid."""
    trusted_proxies: tuple[str, ...]
    """Peer addresses (or CIDR networks) whose X-Real-IP header is believed over TCP. The
    recipe lists none: on the socket every peer is nginx anyway (listen_socket), and over
    TCP any local process may connect and claim any address."""
    rate_limit_window: int
    """Seconds over which failed sign-ins are counted; also the longest Retry-After."""
    rate_limit_user_failures: int
    """Failed sign-ins for one username from one client address within the window before
    that username answers 429 to that address (other addresses are not affected)."""
    rate_limit_address_failures: int
    """Failed sign-ins from one client address within the window before it answers 429."""
    rate_limit_account_failures: int
    """Failed sign-ins for one username from all addresses within the window before the
    account answers 429 to everyone (a guesser spread over many addresses)."""
    refresh_tokens_per_user: int
    """Live refresh tokens kept per user (or deploy token); the oldest is dropped first."""
    audit_log_max_bytes: int
    """The audit log is rotated before it would grow past this size (0: never rotated)."""
    audit_log_backups: int
    """Rotated audit logs kept (audit.log.1 is the newest)."""
    credential_cache_ttl: int
    """Seconds a verified password is remembered per worker (0 disables the cache)."""
    credential_cache_size: int
    """Most verified credentials a worker remembers (least recently used are dropped)."""
    default_registry_enabled: bool
    """Registry switch of projects created without an explicit choice
    (default_projects_features.container_registry)."""
    internal_addr: str
    """Loopback host:port of the service's internal listener: the registry's events
    (POST /-/registry-events) and Prometheus metrics (GET /metrics). Tokens are not
    served there, nor are these paths on listen_addr (nginx's)."""
    events_secret_digest: str
    """SHA-256 (hex) of the secret the registry sends with its events
    (`Authorization: Bearer SECRET`); the secret itself stays in the secrets file."""
    usage_file: Path
    """The usage figures appliance-ctl computes from storage (registry-usage.json)."""
    gc_stats_file: Path
    """The garbage collection's figures (registry-gc.json), exported as metrics."""
    registry_address: str
    """Where the registry answers (host:port or its socket path), asked by the tag rules
    what a tag points at; '' when the appliance runs no registry (then no manifest write
    reaches the service)."""
    maintenance_file: Path
    """The registry's maintenance marker (appliance/registry_maintenance.py): while a
    window is in force, push and delete are refused with a sentence the client prints."""

    @property
    def listen_socket(self) -> Path | None:
        """The unix socket path, when listen_addr names one."""
        return Path(self.listen_addr) if self.listen_addr.startswith("/") else None

    @property
    def listen_host(self) -> str:
        return self.listen_addr.rsplit(":", 1)[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen_addr.rsplit(":", 1)[1])

    @property
    def internal_host(self) -> str:
        return self.internal_addr.rsplit(":", 1)[0].strip("[]")

    @property
    def internal_port(self) -> int:
        return int(self.internal_addr.rsplit(":", 1)[1])

    def to_mapping(self) -> dict:
        """The JSON-ready form, every field present (what the recipe writes); the inverse
        of from_mapping."""
        out = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Path | PostgresDatabase):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[spec.name] = value
        return out


_PATH_FIELDS = {
    "signing_key",
    "signing_certificate",
    "audit_log",
    "usage_file",
    "gc_stats_file",
    "maintenance_file",
}


def load(path: Path) -> AuthConfig:
    """Read and validate the JSON config; every problem is reported in one ConfigError."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"Cannot read the auth config {path}: {error.strerror}.") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"The auth config {path} is not valid JSON: {error}.") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"The auth config {path} must be a JSON object.")
    return from_mapping(raw, source=str(path))


def from_mapping(raw: dict, source: str = "auth config") -> AuthConfig:
    """Validate a parsed config: every field present and well-typed, no unknown key; all
    problems in one ConfigError sentence."""
    fields = {f.name: f for f in dataclasses.fields(AuthConfig)}
    problems = [f"{key}: unknown setting" for key in raw if key not in fields]
    problems += [f"{name}: required" for name in fields if name not in raw]
    values: dict = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        value = values[name] = raw[name]
        if name == "database":
            if isinstance(value, str) and "://" in value:
                problem = url_problem(value)
                if problem:
                    problems.append(f"{name}: the database URL {problem}")
            elif not isinstance(value, str) or not value.startswith("/"):
                problems.append(f"{name}: must be an absolute path or a postgresql:// URL")
        elif name == "database_password_file":
            if not isinstance(value, str) or (value and not value.startswith("/")):
                problems.append(f"{name}: must be an absolute path or ''")
        elif name in _PATH_FIELDS:
            if not isinstance(value, str) or not value.startswith("/"):
                problems.append(f"{name}: must be an absolute path")
            else:
                values[name] = Path(value)
        elif name == "trusted_proxies":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{name}: must be a list of addresses or networks")
            else:
                for entry in value:
                    try:
                        ipaddress.ip_network(entry, strict=False)
                    except ValueError:
                        problems.append(f"{name}: {entry!r} is not an address or network")
                values[name] = tuple(value)
        elif spec.type in ("int", int):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name}: must be a non-negative integer")
        elif spec.type in ("bool", bool):
            if not isinstance(value, bool):
                problems.append(f"{name}: must be true or false")
        elif name == "registry_address":
            if not isinstance(value, str):
                problems.append(f"{name}: must be a string (host:port, a socket path or '')")
        elif spec.type in ("str", str):
            if not isinstance(value, str) or not value:
                problems.append(f"{name}: must be a non-empty string")
    listen = values.get("listen_addr")
    if isinstance(listen, str) and listen and not listen.startswith("/"):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append("listen_addr: must be host:port or a socket path")
    internal = values.get("internal_addr")
    if isinstance(internal, str) and internal:
        host, _, port = internal.rpartition(":")
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not loopback or not port.isdigit() or not 0 < int(port) <= 65535:
            problems.append("internal_addr: must be a loopback address:port")
    for name in ("workers", "threads"):
        if values.get(name) == 0:
            problems.append(f"{name}: must be at least 1")
    if problems:
        # A field the file lacks is most likely one this version added after an older
        # reconfigure wrote the file: reconfigure writes every field again.
        raise ConfigError(
            f"Invalid {source}: "
            + "; ".join(problems)
            + "; run 'appliance-ctl reconfigure' to write it again."
        )
    values["database"] = database_of(values["database"], values["database_password_file"])
    return AuthConfig(**values)


def to_mapping(config: AuthConfig) -> dict:
    """The JSON-ready form of `config`, beside from_mapping (its inverse)."""
    return config.to_mapping()
