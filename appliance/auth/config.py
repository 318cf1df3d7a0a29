"""The auth service's own configuration file (JSON), rendered by the reconfigure recipe.

The service reads nothing else: every knob is a field of AuthConfig, documented below, so
the recipe that writes the file and the server that reads it agree on one schema.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ConfigError


@dataclass(frozen=True)
class AuthConfig:
    """Every setting of the token service. Paths are absolute (already under the root)."""

    database: Path
    """SQLite file holding users, projects, memberships and tokens (shared by all workers)."""
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
    listen_addr: str = "127.0.0.1:5001"
    """host:port the WSGI server binds, or the absolute path of a unix socket. On a socket
    every peer is nginx (only its account may connect) and its X-Real-IP is believed."""
    workers: int = 2
    """Worker processes; one per core is the measured optimum (CPU-bound signing)."""
    threads: int = 4
    """Threads per worker. They mostly hold nginx's idle keep-alive connections (the GIL
    serialises the work itself); keep-alive is what makes threads beat sync workers."""
    token_lifetime: int = 300
    """Seconds a registry token stays valid (`expires_in`)."""
    refresh_token_lifetime: int = 2_592_000
    """Seconds an OAuth2 refresh token (docker login's offline token) stays valid."""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    """Peer addresses (or CIDR networks) whose X-Real-IP header is believed."""
    rate_limit_window: int = 300
    """Seconds over which failed sign-ins are counted; also the longest Retry-After."""
    rate_limit_user_failures: int = 10
    """Failed sign-ins for one username from one client address within the window before
    that username answers 429 to that address (other addresses are not affected)."""
    rate_limit_address_failures: int = 30
    """Failed sign-ins from one client address within the window before it answers 429."""
    rate_limit_account_failures: int = 100
    """Failed sign-ins for one username from all addresses within the window before the
    account answers 429 to everyone (a guesser spread over many addresses)."""
    refresh_tokens_per_user: int = 50
    """Live refresh tokens kept per user (or deploy token); the oldest is dropped first."""
    audit_log_max_bytes: int = 50 * 1024 * 1024
    """The audit log is rotated before it would grow past this size (0: never rotated)."""
    audit_log_backups: int = 10
    """Rotated audit logs kept (audit.log.1 is the newest)."""
    credential_cache_ttl: int = 60
    """Seconds a verified password is remembered per worker (0 disables the cache)."""
    credential_cache_size: int = 10_000
    """Most verified credentials a worker remembers (least recently used are dropped)."""
    default_registry_enabled: bool = True
    """Registry switch of projects created without an explicit choice
    (default_projects_features.container_registry)."""

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


_PATH_FIELDS = {"database", "signing_key", "signing_certificate", "audit_log"}


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
    fields = {f.name: f for f in dataclasses.fields(AuthConfig)}
    problems: list[str] = []
    values: dict = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{key}: unknown setting")
            continue
        values[key] = value
    for name, spec in fields.items():
        required = spec.default is dataclasses.MISSING
        if name not in values:
            if required:
                problems.append(f"{name}: required")
            continue
        value = values[name]
        if name in _PATH_FIELDS:
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
        elif spec.type in ("str", str):
            if not isinstance(value, str) or not value:
                problems.append(f"{name}: must be a non-empty string")
    listen = values.get("listen_addr", AuthConfig.listen_addr)
    if isinstance(listen, str) and not listen.startswith("/"):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append("listen_addr: must be host:port or a socket path")
    for name in ("workers", "threads"):
        if values.get(name, 1) == 0:
            problems.append(f"{name}: must be at least 1")
    if problems:
        raise ConfigError(f"Invalid {source}: " + "; ".join(problems) + ".")
    return AuthConfig(**values)


def to_mapping(config: AuthConfig) -> dict:
    """The JSON-ready form (what the recipe writes); inverse of from_mapping."""
    out = {}
    for spec in dataclasses.fields(AuthConfig):
        value = getattr(config, spec.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[spec.name] = value
    return out
