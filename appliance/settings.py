"""appliance.yml: schema, validation, derivation.

The schema is a tree of frozen dataclasses; each field's metadata carries its doc line
(used for the commented example config) and an optional check. `load()` collects every
problem in one pass and raises one ConfigError listing them all with their key paths,
so an admin fixes the file once instead of once per error. `derive()` is the one
place that fills in values computed from others; it returns new objects and mutates
nothing, so `show-config` prints exactly what the recipes see.

Raw and resolved settings are two types: `load()` validates the file into `RawSettings`
(the schema; a value that follows from others is None there), and `derive()` turns it
into `Settings`, where every derived value is required and typed without None, plus the
run's `HostFacts`, read once by `load()`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.auth.database import Database

DEFAULT_CONFIG = "/etc/appliance/appliance.yml"
SENSITIVE_KEYS = {
    "initial_root_password",
    "internal_key",
    "secretkey",
    "accountkey",
    "accesskeysecret",
    "password",
    "keyfile_contents",
    "Authorization",
    "sessiontoken",
    "private_key",
    "secret",
}
# Free-form names (registry.env variables, notification headers) that carry secrets.
_SENSITIVE_WORDS = (
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "TOKEN",
    "KEY",
    "AUTHORIZATION",
    "COOKIE",
    "CREDENTIAL",
)


def is_sensitive(key: str) -> bool:
    """Whether a value under this key must never be printed.

    Schema and driver keys are lower-case and listed; environment variables and HTTP
    headers are named freely (REGISTRY_STORAGE_S3_SECRETKEY, X-Api-Key), so any of
    those that contains a secret-sounding word is masked too.
    """
    if key in SENSITIVE_KEYS:
        return True
    if key == key.lower():
        return False
    return any(word in key.upper() for word in _SENSITIVE_WORDS)


# ---------------------------------------------------------------- value checks
# A check returns None when the value is fine, else what was expected.

_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
# fullmatch everywhere below: `$` would also match before a trailing newline, and a
# str pattern's \d would take any Unicode digit ('²', '٥'), which nginx and Go refuse.
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*\.?")
_UNSAFE = re.compile(r"[;{}'\"\s\\$#`\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DURATION = re.compile(r"[0-9]+(ns|us|µs|ms|s|m|h)")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_PORT = re.compile(r"[0-9]{1,5}")
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


def is_hostname(value: str) -> bool:
    """A DNS name or an IP address (IPv6 without a zone: neither nginx nor our Go and
    gunicorn listeners take `%zone` in a configured address)."""
    if _HOSTNAME.fullmatch(value) and not re.fullmatch(r"[0-9.]+", value):
        return True  # digits and dots only are an address or nothing ("127.1", "5000")
    return is_ip_address(value)


def is_ip_address(value: str) -> bool:
    if "%" in value:  # ipaddress accepts IPv6 zone IDs ("fe80::1%eth0"); nginx does not
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def split_host_port(value: str) -> tuple[str, int] | None:
    """host and port as Go's net.SplitHostPort reads them, or None when Go (registry)
    or gunicorn (auth) would refuse the address: an IPv6 host must be in brackets, the
    port is 1-65535 in ASCII digits."""
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        return None
    if host.startswith("["):
        if not host.endswith("]") or ":" not in host or not is_ip_address(host[1:-1]):
            return None
        return host[1:-1], int(port)
    if ":" in host or not host or not is_hostname(host):
        return None
    return host, int(port)


ZONE_PROBLEM = (
    "an address without an IPv6 zone ID: nginx, the registry and gunicorn take "
    "no '%eth0'; use the interface's own address"
)


def check_host_port(value: str) -> str | None:
    if "%" in value:
        return ZONE_PROBLEM
    if split_host_port(value) is None:
        return "host:port with a port 1-65535"
    return None


def check_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "a port number 1-65535"


def check_positive(value: int) -> str | None:
    return None if value > 0 else "a number greater than 0"


def check_renew_before_days(value: int) -> str | None:
    """A certificate lives 90 days at Let's Encrypt, at most 398 at any public CA; a
    figure past ten years is a typo (and overflows the date arithmetic)."""
    return None if 0 < value <= 3650 else "a number of days from 1 to 3650"


def check_not_negative(value: int) -> str | None:
    return None if value >= 0 else "a number 0 or greater"


def check_safe_path(value: str) -> str | None:
    if not value.startswith("/"):
        return "an absolute path"
    if _UNSAFE.search(value):
        return "a path without spaces, quotes, ';', '{', '}', '$', '#' or backslashes"
    return None


def check_database_url(value: str) -> str | None:
    from appliance.auth.database import url_problem

    problem = url_problem(value)
    return f"a usable database URL: it {problem}" if problem else None


def check_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    try:
        parts = urlsplit(value)
        parts.hostname  # noqa: B018 - may raise too
    except ValueError:  # an unclosed "[::1", a netloc that NFKC changes
        return "a URL whose host is a valid host name"
    if parts.scheme not in schemes or not parts.hostname:
        return f"a URL starting with {' or '.join(s + '://' for s in schemes)}"
    if _UNSAFE.search(value):
        return "a URL without spaces, quotes, ';', '{', '}' or '$'"
    if not is_hostname(parts.hostname):
        return "a URL whose host is a valid host name"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "a URL with a port 1-65535"
    return None


def check_site_url(value: str) -> str | None:
    problem = check_url(value)
    if problem:
        return problem
    parts = urlsplit(value)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "a URL with no path, like https://registry.example.com"
    return None


def check_listen_address(value: str) -> str | None:
    """nginx's listen grammar: '*', an IPv4 address, an IPv6 one with or without its
    brackets, and no zone ID (nginx has no `%eth0`; use the interface's address)."""
    if value in ("*", "[::]"):
        return None
    if "%" in value:
        return ZONE_PROBLEM
    address = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if value.startswith("[") and ":" not in address:
        return "an IP address, '*' or '[::]'"  # [127.0.0.1] is no IPv6 address
    return None if is_ip_address(address) else "an IP address, '*' or '[::]'"


def check_duration(value: str) -> str | None:
    return None if _DURATION.fullmatch(str(value)) else "a duration such as 500ms, 1s or 5m"


def check_key_type(value: str) -> str | None:
    return None if value in KEY_TYPES else "one of " + ", ".join(KEY_TYPES)


def check_ssl_protocols(value: str) -> str | None:
    words = value.split()
    allowed = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    if not words or any(word not in allowed for word in words):
        return "a space-separated list of " + ", ".join(allowed)
    return None


def check_email(value: str) -> str | None:
    return (
        None
        if re.fullmatch(r"[^@\s;{}'\"\x00-\x1f\x7f]+@[A-Za-z0-9.-]+", value)
        else "an email address"
    )


def check_username(value: str) -> str | None:
    return None if re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value) else "a system user name"


# Longest path the kernel accepts for an AF_UNIX socket (sun_path is 108 bytes with NUL).
UNIX_PATH_MAX = 107


def check_loopback_host_port(value: str) -> str | None:
    """A loopback IP address and a port (127.0.0.1:5101, [::1]:5101): the registry's events
    and the metrics are for this host only."""
    problem = check_host_port(value)
    if problem:
        return problem
    host = str(value).rpartition(":")[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else "a loopback address and port, like 127.0.0.1:5101"


def check_listen_network(value: str) -> str | None:
    return None if value in ("tcp", "unix") else "tcp or unix"


def check_log_level(value: str) -> str | None:
    levels = ("error", "warn", "info", "debug")
    return None if value in levels else "one of " + ", ".join(levels)


REDIS_URL_EXAMPLE = "redis://10.0.0.5:6379/0"


def check_redis_url(value: str) -> str | None:
    """redis://HOST[:PORT][/DB]: what the registry's `redis` section is made of. No
    password in it (it would be printed by show-config and sit in every backup of the
    file): redis.password_file holds it."""
    problem = check_url(value, ("redis",))
    if problem:
        return f"{problem} (such as {REDIS_URL_EXAMPLE})"
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        return (
            f"a URL without a user or password (such as {REDIS_URL_EXAMPLE}); "
            f"put the password in redis.password_file"
        )
    if parts.query or parts.fragment or not re.fullmatch(r"/?|/[0-9]{1,2}", parts.path):
        return f"a URL whose path is at most a database number (such as {REDIS_URL_EXAMPLE})"
    return None


def check_pem_key(value: str) -> str | None:
    return (
        None
        if "-----BEGIN" in value and "PRIVATE KEY-----" in value
        else "a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    )


def doc(
    text: str, check: typing.Callable[[Any], str | None] | None = None, example: Any = None
) -> dict:
    return {"doc": text, "check": check, "example": example}


def setting(
    default: Any, text: str, check: typing.Callable | None = None, example: Any = None
) -> Any:
    if isinstance(default, (list, dict)):
        # each instance gets its own copy of the default list or mapping
        return field(
            default_factory=functools.partial(type(default), default),
            metadata=doc(text, check, example),
        )
    return field(default=default, metadata=doc(text, check, example))


def section(cls: type, text: str) -> Any:
    return field(default_factory=cls, metadata=doc(text))


# ---------------------------------------------------------------- the schema


@dataclass(frozen=True)
class RegistrySettings:
    enable: bool = setting(
        True, "Run the registry. false stops it and removes its vhost; images stay on disk."
    )
    http_addr: str = setting(
        "127.0.0.1:5000",
        "Internal address the registry listens on (nginx proxies to it). Not the public port.",
        check_host_port,
    )
    listen_network: str = setting(
        "tcp",
        "tcp: the registry listens on http_addr. unix: on "
        "<root>/var/opt/appliance/registry-socket/registry.sock, "
        "which only nginx may connect to: no TCP port for the "
        "registry, and pulls through nginx a few points faster "
        "(README, Benchmarks).",
        check_listen_network,
    )
    storage_path: str | None = setting(
        None,
        "Filesystem storage directory. Default: <root>/var/opt/appliance/registry/data.",
        check_safe_path,
    )
    storage: dict = setting(
        {},
        "Storage driver hash, as in the registry's config: "
        "{s3: {bucket: ..., region: ...}}, azure, gcs, swift, oss; "
        "plus optional cache, redirect, maintenance. Empty = filesystem.",
        example={
            "s3": {
                "accesskey": "AKIA...",
                "secretkey": "...",
                "bucket": "registry",
                "region": "us-east-1",
            }
        },
    )
    storage_delete_enabled: bool = setting(True, "Allow deleting images by digest or tag.")
    notifications: list = setting(
        [],
        "Webhook endpoints: name, url, headers, timeout, threshold, backoff, disabled.",
        example=[
            {
                "name": "listener",
                "url": "https://hooks.example.com/event",
                "timeout": "500ms",
                "threshold": 5,
                "backoff": "1s",
                "headers": {"Authorization": ["Bearer TOKEN"]},
            }
        ],
    )
    debug_addr: str | None = setting(
        None,
        "Debug server address (/debug/health, /debug/vars, "
        "/metrics, and /debug/pprof/: profiles and goroutine "
        "dumps, unauthenticated), e.g. 127.0.0.1:5001. Keep it "
        "on loopback.",
        check_host_port,
    )
    compatibility_schema1_enabled: bool = setting(
        False, "Accept schema1 manifests from Docker 1.9 and older."
    )
    env: dict = setting(
        {},
        "Extra environment for the registry process, e.g. REGISTRY_HTTP_RELATIVEURLS: true.",
        example={"REGISTRY_HTTP_RELATIVEURLS": True},
    )
    issuer: str = setting(
        "appliance-issuer", "Token issuer: the auth service signs as this, the registry expects it."
    )
    service: str = setting("container_registry", "Token service (audience) name.")
    internal_key: str | None = setting(
        None,
        "PEM token-signing key to use instead of the generated one (external registry set-ups).",
        check_pem_key,
    )
    key_path: str | None = setting(
        None,
        "Where the token-signing key is written. "
        "Default: <root>/var/opt/appliance/auth/token-signing.key.",
        check_safe_path,
    )
    token_key_type: str = setting(
        "ec-p256",
        "Type of a generated token-signing key (ec-p256 signs ~10x faster than rsa).",
        check_key_type,
    )
    log_level: str = setting("info", "Registry log level.", check_log_level)
    health_storagedriver_enabled: bool = setting(True, "Registry health check of its storage.")
    username: str = setting(
        "appliance-registry",
        "Account the registry runs as (when reconfigure runs as root).",
        check_username,
    )


@dataclass(frozen=True)
class RegistryNginxSettings:
    enable: bool = setting(True, "Serve the registry through nginx (follows registry.enable).")
    listen_port: int | None = setting(
        None,
        "Port of the registry vhost. Default: the port of "
        "registry_external_url (5050 on the main host, 443 on its "
        "own domain).",
        check_port,
    )
    ssl_certificate: str | None = setting(
        None,
        "Certificate file (full chain). Default: "
        "<root>/etc/appliance/ssl/<registry host>.crt; setting "
        "it turns Let's Encrypt off.",
        check_safe_path,
    )
    ssl_certificate_key: str | None = setting(
        None,
        "Key of ssl_certificate. Default: <root>/etc/appliance/ssl/<registry host>.key.",
        check_safe_path,
    )
    ssl_protocols: str = setting("TLSv1.2 TLSv1.3", "nginx ssl_protocols.", check_ssl_protocols)
    proxy_timeout: int = setting(900, "Seconds nginx waits on a slow push or pull.", check_positive)
    hsts_max_age: int = setting(
        63072000,
        "Strict-Transport-Security max-age in seconds "
        "(two years, Mozilla's intermediate profile); 0 sends no "
        "HSTS header.",
        check_not_negative,
    )


@dataclass(frozen=True)
class NginxSettings:
    http_port: int = setting(
        80,
        "Plain-HTTP port: redirects to https and answers Let's Encrypt http-01 challenges.",
        check_port,
    )
    listen_addresses: list = setting(["*"], "Addresses nginx listens on ('*', '[::]', or IPs).")
    worker_processes: str = setting("auto", "nginx worker_processes.")
    redirect_http_to_https: bool = setting(True, "Redirect plain HTTP to the registry's https URL.")


@dataclass(frozen=True)
class WebServerSettings:
    username: str = setting(
        "appliance-www",
        "Account nginx workers run as (when reconfigure runs as root).",
        check_username,
    )


@dataclass(frozen=True)
class AuthSettings:
    enable: bool | None = setting(
        None,
        "Run the token service. Default: with the registry. "
        "true with registry.enable: false serves only /jwt/auth, "
        "for an external registry (the guide's GitLab-as-auth case).",
    )
    listen_network: str = setting(
        "unix",
        "unix: the token service listens on "
        "<root>/var/opt/appliance/auth-socket/auth.sock, which only "
        "nginx may connect to, and believes the client address "
        "nginx sends (X-Real-IP). tcp: on listen_addr, where any "
        "local process may connect, so X-Real-IP is ignored and "
        "every client counts as nginx's address.",
        check_listen_network,
    )
    listen_addr: str = setting(
        "127.0.0.1:5100",
        "Address the token service listens on with listen_network: tcp.",
        check_host_port,
    )
    internal_addr: str = setting(
        "127.0.0.1:5101",
        "Loopback address of the token service's internal listener, whatever "
        "listen_network is: the registry's events (push and pull history, usage) "
        "and Prometheus metrics at /metrics. Never served through nginx.",
        check_loopback_host_port,
    )
    workers: int = setting(2, "Token service worker processes (one per core).", check_positive)
    threads: int = setting(
        4, "Threads per worker (keep-alive connections from nginx).", check_positive
    )
    token_lifetime: int = setting(300, "Seconds a registry token is valid.", check_positive)
    refresh_token_lifetime: int = setting(
        2592000, "Seconds a docker login refresh token is valid.", check_positive
    )
    database_path: str | None = setting(
        None, "SQLite database. Default: <root>/var/opt/appliance/auth/auth.db.", check_safe_path
    )
    database_url: str | None = setting(
        None,
        "The auth data on PostgreSQL instead of SQLite, shared by several nodes: "
        "postgresql://user@host:port/database (no password in it). Every node names "
        "the same database; see Several hosts in the README.",
        check_database_url,
    )
    database_password_file: str | None = setting(
        None,
        "File whose first line is the PostgreSQL user's password (with database_url); "
        "reconfigure copies it, mode 0600, for the token service's account. Unset: no "
        "password (trust, peer or certificate authentication on the server).",
        check_safe_path,
    )
    max_failed_logins: int = setting(
        10, "Failed sign-ins per user or address before 429.", check_positive
    )
    failed_login_window: int = setting(
        300, "Seconds over which failed sign-ins count.", check_positive
    )
    credential_cache_ttl: int = setting(
        30,
        "Seconds a verified password is remembered (a password change ends it at once).",
        check_positive,
    )
    credential_cache_size: int = setting(
        10000,
        "Verified passwords each worker remembers (the least recently used are dropped).",
        check_positive,
    )
    refresh_tokens_per_user: int = setting(
        50,
        "Live refresh tokens (docker login) kept per "
        "user or deploy token; the oldest is dropped "
        "first.",
        check_positive,
    )
    username: str = setting(
        "appliance-auth",
        "Account the token service runs as (when reconfigure runs as root).",
        check_username,
    )


@dataclass(frozen=True)
class LetsEncryptSettings:
    enable: bool | None = setting(
        None,
        "Obtain certificates from Let's Encrypt. Default: on "
        "for an https URL with a public host name and no "
        "certificate files configured.",
    )
    directory_url: str = setting(
        "https://acme-v02.api.letsencrypt.org/directory",
        "ACME directory (staging: https://acme-staging-v02.api.letsencrypt.org/directory).",
        check_url,
    )
    ca_bundle: str | None = setting(
        None, "CA bundle to trust for the ACME directory (a private ACME server).", check_safe_path
    )
    contact_emails: list = setting(
        [], "Emails Let's Encrypt writes to about expiry.", example=["admin@example.com"]
    )
    key_type: str = setting("ec-p256", "Certificate key type.", check_key_type)
    renew_before_days: int = setting(
        30, "Renew this many days before expiry.", check_renew_before_days
    )
    auto_renew: bool = setting(True, "Run the renewer (twice a day, per-host jitter).")
    runs_per_day: int = setting(2, "Renewal checks per day.", check_positive)


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = setting(
        None,
        "Redis the registry keeps its blob-descriptor cache in (storage.cache.blobdescriptor: "
        "redis), redis://HOST[:PORT][/DB]; every node of a cluster names the same one "
        "(README, Several hosts). Empty: the registry caches in its own memory.",
        check_redis_url,
        example=REDIS_URL_EXAMPLE,
    )
    password_file: str | None = setting(
        None,
        "File holding the Redis password (requirepass), read by reconfigure; the "
        "password itself never goes in appliance.yml.",
        check_safe_path,
    )


@dataclass(frozen=True)
class DefaultProjectsFeatures:
    container_registry: bool = setting(
        True, "Registry on for new projects (owners may change it per project)."
    )


@dataclass(frozen=True)
class LoggingSettings:
    max_bytes: int = setting(50 * 1024 * 1024, "Rotate a service log at this size.", check_positive)
    backups: int = setting(10, "Rotated logs kept per service.", check_positive)


def check_age(value: str) -> str | None:
    from appliance.errors import UsageError
    from appliance.retention import parse_age

    try:
        parse_age("", value)
    except UsageError:
        return "an age such as 30d, 12h or 2w (units s, m, h, d, w)"
    return None


def check_schedule(value: str) -> str | None:
    problem = check_age(value)
    if problem:
        return "a period such as 24h, 7d or 30m (units s, m, h, d, w)"
    from appliance.retention import parse_age

    return None if parse_age("", value) >= 10 else "a period of 10s or more"


def check_patterns(value: list) -> str | None:
    from appliance.errors import UsageError
    from appliance.retention import check_pattern

    if not _is_list_of_strings(value):
        return "a list of regular expressions"
    for pattern in value:
        try:
            check_pattern("", pattern)
        except UsageError:
            return f"a list of valid regular expressions ({pattern!r} is not one)"
    return None


@dataclass(frozen=True)
class RetentionDefaultSettings:
    enable: bool = setting(
        False, "Give each new project this retention policy (appliance-ctl project create)."
    )
    keep_last: int | None = setting(
        10, "Keep the newest N tags of each repository.", check_not_negative
    )
    keep: list = setting([], "Keep tags matching any of these regexes (re.search).", check_patterns)
    older_than: str | None = setting("30d", "Keep tags pushed within this age.", check_age)
    pulled_within: str | None = setting(
        None, "Keep tags pulled within this age.", check_age, example="14d"
    )
    max_delete: int | None = setting(
        None,
        "A run that would delete more tags of a project deletes none of them.",
        check_not_negative,
        example=100,
    )


@dataclass(frozen=True)
class RetentionSettings:
    default: RetentionDefaultSettings = section(
        RetentionDefaultSettings, "The policy new projects get (appliance-ctl project retention)."
    )


@dataclass(frozen=True)
class JanitorSettings:
    enable: bool = setting(
        False, "Run the janitor service: retention policies, then the garbage collection."
    )
    schedule: str = setting(
        "24h", "How often the janitor runs (its start shifted per host).", check_schedule
    )
    garbage_collect: bool = setting(
        True, "After the retention policies, collect the garbage (a read-only window)."
    )


@dataclass(frozen=True)
class Paths:
    """Every path the appliance uses, derived from `root` (never read from the file)."""

    root: Path
    config_dir: Path
    config_file: Path
    secrets_file: Path
    initial_root_password_file: Path
    ssl_dir: Path
    data_dir: Path
    log_dir: Path
    lock_file: Path
    supervisor_dir: Path
    supervisor_config: Path
    supervisor_socket: Path
    registry_dir: Path
    registry_config: Path
    registry_socket: Path
    token_bundle: Path
    nginx_dir: Path
    nginx_config: Path
    acme_webroot: Path
    auth_dir: Path
    auth_config: Path
    token_signing_certificate: Path
    auth_socket: Path
    registry_storage_lock: Path
    registry_usage_file: Path
    registry_gc_file: Path
    registry_maintenance: Path
    janitor_state: Path

    @classmethod
    def under(cls, root: Path, config_file: Path) -> Paths:
        config_dir = root / "etc/appliance"
        data = root / "var/opt/appliance"
        return cls(
            root=root,
            config_dir=config_dir,
            config_file=config_file,
            secrets_file=config_dir / "appliance-secrets.json",
            initial_root_password_file=config_dir / "initial_root_password",
            ssl_dir=config_dir / "ssl",
            data_dir=data,
            log_dir=root / "var/log/appliance",
            lock_file=data / "reconfigure.lock",
            supervisor_dir=data / "supervisor",
            supervisor_config=data / "supervisor/supervisord.conf",
            supervisor_socket=data / "supervisor/supervisor.sock",
            registry_dir=data / "registry",
            registry_config=data / "registry/config.yml",
            # Not under registry/: nginx's workers must reach the socket, not the config.
            registry_socket=data / "registry-socket/registry.sock",
            token_bundle=data / "registry/token-bundle.crt",
            nginx_dir=data / "nginx",
            nginx_config=data / "nginx/conf/nginx.conf",
            acme_webroot=data / "nginx/acme-webroot",
            auth_dir=data / "auth",
            auth_config=data / "auth/config.json",
            token_signing_certificate=data / "auth/token-signing.crt",
            # Not under auth/: nginx's workers must reach the socket, not the key.
            auth_socket=data / "auth-socket/auth.sock",
            # Held by every run that changes the registry's storage (appliance.registry_storage).
            registry_storage_lock=data / "registry-storage.lock",
            # Usage figures appliance-ctl computes from storage (0644: the auth service
            # reads them for quotas and metrics), and the garbage collection's figures.
            registry_usage_file=data / "registry-usage.json",
            registry_gc_file=data / "registry-gc.json",
            # The maintenance window's marker (appliance.registry_maintenance), read by
            # the registry's wrapper and the token service: 0644 in a 0755 directory.
            registry_maintenance=data / "registry-maintenance.json",
            # The janitor's last run and next one (appliance-ctl status reads it).
            janitor_state=data / "janitor.json",
        )


@dataclass(frozen=True)
class RawSettings:
    """appliance.yml as the admin wrote it, validated: what derive() starts from.

    A value left to a default that follows from others is None here; `Settings`, which
    derive() returns, has it filled in.
    """

    root: str = setting(
        "/",
        "Every default path lives under this directory (tests and demos "
        "run the whole appliance unprivileged in a temporary one).",
        check_safe_path,
    )
    external_url: str = setting("https://localhost", "URL of this host.", check_site_url)
    registry_external_url: str | None = setting(
        None,
        "URL users docker login to. Default: port 5050 of external_url's host.",
        check_site_url,
        example="https://registry.example.com",
    )
    initial_root_password: str | None = setting(
        None,
        "Password of the admin user root on "
        "first reconfigure. Default: generated, written "
        "to <root>/etc/appliance/initial_root_password.",
    )
    manage_accounts: bool = setting(True, "Create the service accounts when running as root.")
    registry: RegistrySettings = section(RegistrySettings, "The Distribution registry.")
    registry_nginx: RegistryNginxSettings = section(
        RegistryNginxSettings, "The registry's nginx vhost."
    )
    nginx: NginxSettings = section(NginxSettings, "nginx as a whole.")
    web_server: WebServerSettings = section(WebServerSettings, "nginx worker account.")
    auth: AuthSettings = section(AuthSettings, "The token service.")
    letsencrypt: LetsEncryptSettings = section(LetsEncryptSettings, "Let's Encrypt.")
    redis: RedisSettings = section(RedisSettings, "A shared Redis (several hosts).")
    default_projects_features: DefaultProjectsFeatures = section(
        DefaultProjectsFeatures, "Defaults for new projects."
    )
    logging: LoggingSettings = section(LoggingSettings, "Service logs.")
    retention: RetentionSettings = section(RetentionSettings, "Retention policies.")
    janitor: JanitorSettings = section(JanitorSettings, "Scheduled maintenance.")

    @property
    def default_registry_enabled(self) -> bool:
        return self.default_projects_features.container_registry


# ---------------------------------------------------------------- resolved settings
# What derive() returns and every recipe reads. Each resolved class is its schema class
# with the values derive() fills in narrowed to their type (never None), so a recipe
# neither asserts nor falls back to a default of its own. They are keyword-only and
# have no defaults (`= field()`: a bare annotation would inherit the schema's None),
# so a resolved value can only come from derive().


@dataclass(frozen=True, kw_only=True)
class ResolvedRegistrySettings(RegistrySettings):
    storage_path: str = field()
    key_path: str = field()


@dataclass(frozen=True, kw_only=True)
class ResolvedRegistryNginxSettings(RegistryNginxSettings):
    listen_port: int = field()
    ssl_certificate: str = field()
    ssl_certificate_key: str = field()


@dataclass(frozen=True, kw_only=True)
class ResolvedAuthSettings(AuthSettings):
    enable: bool = field()
    database_path: str = field()


@dataclass(frozen=True, kw_only=True)
class ResolvedLetsEncryptSettings(LetsEncryptSettings):
    enable: bool = field()


# Debian's docker-registry, or EL's docker-distribution/distribution: same `serve CONFIG`.
REGISTRY_BINARIES = ("/usr/bin/docker-registry", "/usr/bin/registry")


def registry_binary() -> str:
    """The registry program installed on this host (the first of REGISTRY_BINARIES)."""
    return next((b for b in REGISTRY_BINARIES if Path(b).exists()), REGISTRY_BINARIES[0])


@dataclass(frozen=True)
class HostFacts:
    """What a run needs to know about the host, read once when the settings are loaded
    (`HostFacts.read`): every recipe of a run sees the same host, however often it asks
    and whatever changes on disk meanwhile. derive() reads none of them.

    The defaults are what derive() assumes when it is not told: an unprivileged run on
    a host with nothing on it.
    """

    run_as_root: bool = False
    registry_binary: str = REGISTRY_BINARIES[0]
    config_file_present: bool = False
    # A CA-signed certificate at the default path that the appliance did not write
    # (appliance.certificates.placed_by_admin): served as it is, never replaced.
    certificate_placed_by_admin: bool = False

    @classmethod
    def read(cls, s: Settings) -> HostFacts:
        from appliance.certificates import placed_by_admin

        return cls(
            run_as_root=os.geteuid() == 0,
            registry_binary=registry_binary(),
            config_file_present=s.paths.config_file.exists(),
            certificate_placed_by_admin=placed_by_admin(s),
        )


# How the registry's certificate is obtained (README, TLS): decided once, by derive().
TlsMode = typing.Literal["letsencrypt", "files", "self-signed"]


def _derived() -> Any:
    return field(metadata={"derived": True})


@dataclass(frozen=True, kw_only=True)
class Settings(RawSettings):
    """The settings a run uses: what derive() makes of a RawSettings, with the run's host
    facts. Every value derive() fills in is required here; show-config prints this."""

    registry_external_url: str = field()
    registry: ResolvedRegistrySettings
    registry_nginx: ResolvedRegistryNginxSettings
    auth: ResolvedAuthSettings
    letsencrypt: ResolvedLetsEncryptSettings

    # Derived by derive(); never read from the file.
    paths: Paths = _derived()
    host: str = _derived()
    registry_host: str = _derived()
    registry_port: int = _derived()
    registry_on_own_domain: bool = _derived()
    token_realm: str = _derived()
    tls_mode: TlsMode = _derived()
    # Not part of what the settings are: two equal configs are equal settings.
    facts: HostFacts = field(compare=False, metadata={"derived": True})

    @property
    def auth_database(self) -> Database:
        """The auth store as root's commands open it: the SQLite file, or the PostgreSQL
        database with the admin's password file (the service reads its own copy)."""
        if self.auth.database_url:
            from appliance.auth.database import PostgresDatabase

            password = self.auth.database_password_file
            return PostgresDatabase(self.auth.database_url, Path(password) if password else None)
        return Path(self.auth.database_path)


# ---------------------------------------------------------------- loading


def config_path(cli_path: str | None) -> tuple[Path, bool]:
    """Which config to read, and whether the admin named it (a named file must exist)."""
    if cli_path:
        return Path(cli_path), True
    if os.environ.get("APPLIANCE_CONFIG"):
        return Path(os.environ["APPLIANCE_CONFIG"]), True
    return Path(DEFAULT_CONFIG), False


# Bounds on what is read at all. appliance.yml is a few kilobytes; these are far above
# any real one and far below what costs a second or a gigabyte: a YAML alias is shared
# when loaded, so a small file can name billions of values ("billion laughs") and only
# a walk over them (validation, an error message) pays. Measured with PyYAML's pure-
# Python loader: 50,000 values load in about a second.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_VALUES = 50_000
MAX_CONFIG_DEPTH = 32


class ConfigTooLarge(Exception):
    """The file exceeds one of the bounds above; the message says which and where."""


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, and input too big or
    too deep to be an appliance.yml before it costs memory or time.

    Plain YAML loaders keep the last value, so a second `registry:` block would silently
    replace the first; the YAML spec says keys are unique, so it is reported as invalid.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_CONFIG_DEPTH:
            raise ConfigTooLarge(
                f"nested more than {MAX_CONFIG_DEPTH} levels deep at line "
                f"{self.peek_event().start_mark.line + 1}"
            )
        if self.nodes > MAX_CONFIG_VALUES:
            raise ConfigTooLarge(
                f"more than {MAX_CONFIG_VALUES} values (at line "
                f"{self.peek_event().start_mark.line + 1})"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.ScalarNode) and not _encodable(node.value):
            raise yaml.constructor.ConstructorError(
                None, None, "a \\u escape that is no character (a lone surrogate)", node.start_mark
            )
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # a 5000-digit int, a 13th month
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({str(exc)[:80]})", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {_brief(key_node.value)} appears twice in one mapping",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _encodable(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def expanded_size(node: yaml.Node) -> int:
    """How many values `node` stands for once every alias is expanded, refusing more
    than MAX_CONFIG_VALUES, deeper than MAX_CONFIG_DEPTH, or an alias inside itself.

    Shared nodes are counted once per use but walked once (memoized), so the walk
    costs what the file costs, not what it expands to.
    """
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height)
    open_nodes: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise ConfigTooLarge(
                f"the value at line {node.start_mark.line + 1} contains an alias to itself"
            )
        if key not in known:
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigTooLarge(
                    f"nested more than {MAX_CONFIG_DEPTH} levels deep once its aliases are expanded"
                )
            open_nodes.add(key)
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            values, height = 1, 0
            for child in children:
                child_values, child_height = walk(child, depth + 1)
                values += child_values
                height = max(height, child_height + 1)
                if values > MAX_CONFIG_VALUES:
                    raise ConfigTooLarge(
                        f"more than {MAX_CONFIG_VALUES} values once its aliases are expanded"
                    )
            open_nodes.discard(key)
            known[key] = (values, height)
        values, height = known[key]
        if depth + height > MAX_CONFIG_DEPTH:
            raise ConfigTooLarge(
                f"nested more than {MAX_CONFIG_DEPTH} levels deep once its aliases are expanded"
            )
        return known[key]

    return walk(node, 1)[0]


def parse_yaml(text: str) -> Any:
    """The document in `text`, within the bounds above (ConfigTooLarge otherwise)."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config(path: Path, must_exist: bool) -> dict:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file is
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(
                f"{path}: no such file; create it (appliance-ctl example-config "
                f"prints a commented one) or leave out -c."
            ) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB, which "
            f"no appliance.yml needs; is it the right file?"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line "
            f"{line}); save it as UTF-8."
        ) from None
    try:
        data = parse_yaml(text)
    except ConfigTooLarge as exc:
        raise ConfigError(
            f"{path}: {exc}, which no appliance.yml needs; is it the right file?"
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise ConfigError(
            f"{path}: not a text file (character #x{exc.character:04x} at line "
            f"{line}); appliance.yml is YAML text."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}."
        )
    return data


def load(path: Path, must_exist: bool = False, overrides: dict | None = None) -> Settings:
    raw = read_config(path, must_exist)
    if overrides:
        raw = {**raw, **overrides}
    problems: list[str] = []
    schema = _build(RawSettings, raw, "", problems)
    rejected = {problem.split(":", 1)[0] for problem in problems}
    problems.extend(_cross_checks(schema, rejected))
    if problems:
        raise ConfigError(
            f"{path}: {len(problems)} problem{'s' * (len(problems) > 1)} "
            f"found; nothing was changed.",
            problems,
        )
    return with_host_facts(derive(schema, path))


def with_host_facts(s: Settings) -> Settings:
    """The settings with the host facts a run needs, read here once (derive() reads none;
    whether a certificate was placed by hand depends on the paths derive() fills in)."""
    return dataclasses.replace(s, facts=HostFacts.read(s))


def did_you_mean(word: str, choices: Any, n: int = 1, cutoff: float = 0.6) -> list[str]:
    import difflib  # only a config with a typo pays for it

    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def _type_name(tp: Any) -> str:
    names = {
        bool: "true or false",
        int: "a whole number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return names.get(args[0], str(args[0]))
    return names.get(tp, str(tp))


def _matches(tp: Any, value: Any) -> bool:
    args = typing.get_args(tp)
    if args and (typing.get_origin(tp) in (typing.Union, types.UnionType)):
        return any(_matches(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a mapping of keys, got {_brief(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{_key(key)}"
        if key not in fields:
            close = did_you_mean(_key(key), fields, n=1, cutoff=0.6)
            hint = (
                f"; did you mean {prefix}{close[0]}?"
                if close
                else f"; valid keys here: {', '.join(sorted(fields))}"
            )
            problems.append(f"{path}: unknown key{hint}")
            continue
        f, tp = fields[key], hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value if value is not None else {}, f"{path}.", problems)
            continue
        if not _matches(tp, value):
            problems.append(f"{path}: {_show(key, value)} is not {_type_name(tp)}")
            continue
        check = f.metadata.get("check")
        if check and value is not None:
            problem = check(value)
            if problem:
                problems.append(f"{path}: {_show(key, value)} is not {problem}")
                continue
        values[key] = value
    return cls(**values)


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")
# libpq also takes a password as a URL parameter (?password=..., ?sslpassword=...).
_URL_PASSWORD_PARAMETER = re.compile(r"([?&](?:ssl)?password=)[^&]*")


def _show(key: str, value: Any) -> str:
    if is_sensitive(str(key)):
        return "the value"
    if isinstance(value, str):
        # A URL's password (redis://:PASSWORD@host, a database_url's user:PASSWORD@ or
        # ?password=) is no more shown than a password key.
        value = _URL_PASSWORD.sub(r"\1***@", value)
        value = _URL_PASSWORD_PARAMETER.sub(r"\1***", value)
    # JSON quoting: a newline or quote in the value stays visible and the problem stays
    # on one line of the report.
    text = json.dumps(value[:100], ensure_ascii=False) if isinstance(value, str) else _brief(value)
    return text if len(text) < 80 else text[:77] + '..."'


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60


def _brief(value: Any) -> str:
    """repr() that stops early: a value may stand for millions (aliases) or be a
    megabyte long, and a message shows only its start."""
    return _REPR.repr(value)


def _key(key: Any) -> str:
    """A key as it appears in a key path: as written, cut short if very long, quoted
    if it holds a newline or another control character (a problem stays one line)."""
    text = str(key) if isinstance(key, str) else _brief(key)
    if _CONTROL.search(text):
        text = json.dumps(text[:60], ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# Storage drivers the registry knows, with the keys each one cannot do without.
STORAGE_DRIVERS = {
    "filesystem": (),
    "s3": ("bucket", "region"),
    "azure": ("accountname", "accountkey", "container"),
    "gcs": ("bucket",),
    "swift": ("username", "password", "authurl", "container"),
    "oss": ("accesskeyid", "accesskeysecret", "region", "bucket"),
    "inmemory": (),
}
STORAGE_EXTRAS = ("cache", "redirect", "maintenance", "delete")


def _cross_checks(s: RawSettings, rejected: set[str] | None = None) -> list[str]:
    """Checks that look at more than one value, or inside free-form hashes: one small
    function per section, each table-tested on its own (tests/unit/test_settings_checks.py).

    `rejected` are key paths whose value was already refused (and left at its default
    here); a check about them would only repeat that problem in other words.
    """
    return [
        *check_storage(s.registry.storage),
        *check_redis(s),
        *check_notifications(s.registry.notifications),
        *check_env(s.registry.env),
        *check_nginx(s.nginx),
        *check_contact_emails(s.letsencrypt.contact_emails),
        *check_tls(s, rejected or set()),
        *check_ports(s),
        *check_retention_default(s.retention.default),
        *check_auth_database(s.auth),
    ]


def check_redis(s: RawSettings) -> list[str]:
    """redis: a password file needs a URL, and the registry's cache in Redis needs one."""
    problems = []
    if s.redis.password_file and not s.redis.url:
        problems.append(
            "redis.password_file: set only with redis.url (the Redis it is the password of)"
        )
    cache = s.registry.storage.get("cache")
    if isinstance(cache, dict) and cache.get("blobdescriptor") == "redis" and not s.redis.url:
        problems.append(
            "registry.storage.cache.blobdescriptor: redis needs redis.url, the Redis "
            "to keep the cache in"
        )
    return problems


def check_auth_database(auth: AuthSettings) -> list[str]:
    """database_url and database_path name two different databases: only one may be set;
    a password file means nothing without database_url."""
    problems = []
    if auth.database_url and auth.database_path:
        problems.append(
            "auth.database_path: set together with auth.database_url; remove one"
            " (database_path is the SQLite file, database_url the PostgreSQL database)"
        )
    if auth.database_password_file and not auth.database_url:
        problems.append(
            "auth.database_password_file: only used with auth.database_url; set"
            " database_url or remove it"
        )
    return problems


def check_storage(storage: dict) -> list[str]:
    """registry.storage: one known driver with its required parameters, and the extras
    (cache, redirect, maintenance, delete) in the shapes the registry reads."""
    problems = []
    drivers = [k for k in storage if k not in STORAGE_EXTRAS]
    for key in drivers:
        if key not in STORAGE_DRIVERS:
            close = did_you_mean(_key(key), STORAGE_DRIVERS, n=1)
            hint = (
                f"; did you mean {close[0]}?"
                if close
                else f"; drivers: {', '.join(STORAGE_DRIVERS)}"
            )
            problems.append(f"registry.storage.{_key(key)}: unknown storage driver{hint}")
    if len(drivers) > 1:
        problems.append(
            f"registry.storage: one driver at a time, found {', '.join(_key(d) for d in drivers)}"
        )
    for key in drivers:
        problems += check_driver(key, storage[key])
    for extra in ("cache", "maintenance", "delete"):
        if storage.get(extra) is not None and not isinstance(storage[extra], dict):
            # the registry reads each of them as a mapping and will not start otherwise
            problems.append(
                f"registry.storage.{extra}: expected a mapping, as in the registry's own config"
            )
    redirect = storage.get("redirect")
    if redirect is not None and (
        not isinstance(redirect, dict) or not isinstance(redirect.get("disable", False), bool)
    ):
        problems.append("registry.storage.redirect: expected {disable: true|false}")
    return problems


def check_driver(key: Any, params: Any) -> list[str]:
    """One driver's parameters: a mapping of names, with what the driver cannot do without."""
    where = f"registry.storage.{_key(key)}"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return [f"{where}: expected a mapping of driver settings"]
    problems = []
    if not all(isinstance(name, str) for name in params):
        # the registry reads driver parameters into a map of strings
        problems.append(f"{where}: parameter names must be strings")
    for required in STORAGE_DRIVERS.get(key, ()):
        if params.get(required) in (None, ""):
            problems.append(f"{where}.{required}: required by the {key} driver")
    if "regionendpoint" in params and check_url(str(params["regionendpoint"])):
        problems.append(
            f"{where}.regionendpoint: "
            f"{_show('regionendpoint', params['regionendpoint'])} is not a URL "
            f"such as http://127.0.0.1:9000"
        )
    if "rootdirectory" in params and (
        not isinstance(params["rootdirectory"], str) or check_safe_path(params["rootdirectory"])
    ):
        problems.append(
            f"{where}.rootdirectory: {_show('', params['rootdirectory'])} is not "
            f"an absolute path without spaces, quotes or shell characters"
        )
    if "chunksize" in params and (
        type(params["chunksize"]) is not int or params["chunksize"] < 5 * 1024 * 1024
    ):
        problems.append(
            f"{where}.chunksize: must be a whole number of bytes, at least "
            f"5242880 (25000000 to 50000000 is typical)"
        )
    return problems


ENDPOINT_KEYS = {
    "name",
    "url",
    "headers",
    "timeout",
    "threshold",
    "backoff",
    "disabled",
    "ignoredmediatypes",
    "ignore",
}


def check_retention_default(default: RetentionDefaultSettings) -> list[str]:
    """An enabled default needs an age or a count: without either it would delete every
    tag no pattern keeps in each new project."""
    if default.enable and default.keep_last is None and default.older_than is None:
        return [
            "retention.default: an enabled policy needs keep_last or older_than (or both); "
            "without either it deletes every tag no pattern keeps"
        ]
    return []


def check_notifications(endpoints: list) -> list[str]:
    """registry.notifications: each endpoint on its own, and names used once."""
    problems = []
    names: set[str] = set()
    for i, endpoint in enumerate(endpoints):
        where = f"registry.notifications[{i}]"
        if not isinstance(endpoint, dict):
            problems.append(f"{where}: expected a mapping with name and url")
            continue
        problems += check_endpoint(where, endpoint)
        name = endpoint.get("name")
        if name in ("appliance-events", "appliance-pulls"):
            problems.append(f'{where}.name: "{name}" is the appliance\'s own; choose another name')
        if isinstance(name, str) and name:
            if name in names:
                problems.append(f'{where}.name: "{name}" is used twice')
            names.add(name)
    return problems


def check_endpoint(where: str, endpoint: dict) -> list[str]:
    """One notification endpoint, in the shape the registry's config reads."""
    problems = []
    for key in endpoint:
        if key not in ENDPOINT_KEYS:
            close = did_you_mean(_key(key), ENDPOINT_KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(f"{where}.{_key(key)}: unknown key{hint}")
    if not endpoint.get("name"):
        problems.append(f"{where}.name: required")
    elif not isinstance(endpoint["name"], str):
        problems.append(f"{where}.name: {_show('name', endpoint['name'])} is not a string")
    if not endpoint.get("url") or check_url(str(endpoint["url"])):
        problems.append(f"{where}.url: required, a URL starting with http:// or https://")
    for key in ("timeout", "backoff"):
        if key in endpoint and (
            not isinstance(endpoint[key], str) or check_duration(endpoint[key])
        ):
            problems.append(
                f"{where}.{key}: {_show(key, endpoint[key])} is not a duration "
                f"such as 500ms, 1s or 5m"
            )
    if "threshold" in endpoint and (
        type(endpoint["threshold"]) is not int or endpoint["threshold"] < 1
    ):
        problems.append(f"{where}.threshold: a whole number of failures, at least 1")
    if "disabled" in endpoint and not isinstance(endpoint["disabled"], bool):
        problems.append(f"{where}.disabled: true or false")
    if not _is_list_of_strings(endpoint.get("ignoredmediatypes") or []):
        problems.append(f"{where}.ignoredmediatypes: a list of media types")
    ignore = endpoint.get("ignore") or {}
    if (
        not isinstance(ignore, dict)
        or set(ignore) - {"mediatypes", "actions"}
        or not all(_is_list_of_strings(v) for v in ignore.values())
    ):
        problems.append(
            f"{where}.ignore: a mapping with mediatypes and actions, each a "
            f"list of strings, e.g. {{actions: [pull]}}"
        )
    headers = endpoint.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and _is_list_of_strings(v) for k, v in headers.items()
    ):
        problems.append(
            f"{where}.headers: a mapping of header name to a list of strings, "
            f'e.g. {{Authorization: ["Bearer TOKEN"]}}'
        )
    return problems


def check_env(env: dict) -> list[str]:
    """registry.env: names and values supervisord's environment= can carry unchanged."""
    problems = []
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            problems.append(
                f"registry.env.{_key(key)}: not an environment variable name (A-Z, 0-9, _)"
            )
        elif not isinstance(value, (str, int, bool)) or _CONTROL.search(str(value)):
            problems.append(f"registry.env.{key}: a single-line string, number or boolean")
        elif isinstance(value, str) and (
            value[:1] in ("'", '"') or value[-1:] in ("'", '"') or ("'" in value and '"' in value)
        ):
            # supervisord's environment= parser strips surrounding quotes and has no escapes
            problems.append(
                f"registry.env.{key}: a value that neither starts nor ends with a "
                f"quote and does not contain both ' and \""
            )
    return problems


def check_nginx(n: NginxSettings) -> list[str]:
    """nginx: listen addresses in nginx's grammar, and worker_processes."""
    problems = []
    for i, address in enumerate(n.listen_addresses):
        problem = (
            check_listen_address(address)
            if isinstance(address, str)
            else "an IP address, '*' or '[::]'"
        )
        if problem:
            problems.append(f"nginx.listen_addresses[{i}]: {_show('', address)} is not {problem}")
    if not n.listen_addresses:
        problems.append("nginx.listen_addresses: at least one address")
    if not re.fullmatch(r"auto|[0-9]{1,3}", n.worker_processes):
        problems.append(
            f"nginx.worker_processes: {_show('', n.worker_processes)} is not 'auto' or a number"
        )
    return problems


def check_contact_emails(emails: list) -> list[str]:
    return [
        f"letsencrypt.contact_emails[{i}]: {_show('', email)} is not an email address"
        for i, email in enumerate(emails)
        if not isinstance(email, str) or check_email(email)
    ]


def check_tls(s: RawSettings, rejected: set[str]) -> list[str]:
    """Certificate files, Let's Encrypt and the registry URL's scheme, together."""
    problems = []
    rn = s.registry_nginx
    if bool(rn.ssl_certificate) != bool(rn.ssl_certificate_key) and not rejected & {
        "registry_nginx.ssl_certificate",
        "registry_nginx.ssl_certificate_key",
    }:
        problems.append(
            "registry_nginx.ssl_certificate_key: set both ssl_certificate and "
            "ssl_certificate_key, or neither"
        )
    if rn.ssl_certificate and s.letsencrypt.enable:
        problems.append(
            "letsencrypt.enable: true conflicts with registry_nginx.ssl_certificate; "
            "remove the certificate paths to use Let's Encrypt, or set "
            "letsencrypt.enable: false"
        )
    registry_url = registry_url_of(s)
    if urlsplit(registry_url).scheme != "https":
        problems.append(
            f'registry_external_url: "{registry_url}" must be https; clients '
            f"refuse plain-HTTP registries unless each one is told it is insecure"
        )
    return problems


def check_ports(s: RawSettings) -> list[str]:
    """No two listeners on one port: nginx's two ports, the internal services' addresses,
    and an internal service on a port nginx binds on the same address."""
    problems = []
    registry_url = registry_url_of(s)
    ports: dict[int, str] = {}
    port = s.registry_nginx.listen_port or urlsplit(registry_url).port or 443
    for name, number in (
        ("nginx.http_port", s.nginx.http_port),
        ("registry_nginx.listen_port", port),
    ):
        if number in ports:
            problems.append(f"{name}: {number} is also {ports[number]}; pick another port")
        ports[number] = name
    addrs = {"registry.http_addr": s.registry.http_addr, "auth.listen_addr": s.auth.listen_addr}
    if s.registry.listen_network == "unix":
        del addrs["registry.http_addr"]  # the registry has no TCP port
        socket = Paths.under(Path(s.root), Path(DEFAULT_CONFIG)).registry_socket
        if len(bytes(socket)) > UNIX_PATH_MAX:
            problems.append(
                f"registry.listen_network: the socket path {socket} is longer "
                f"than the {UNIX_PATH_MAX} bytes a unix socket may have; use a "
                f"shorter root, or listen_network: tcp"
            )
    if s.auth.listen_network == "unix":
        del addrs["auth.listen_addr"]  # the token service has no TCP port
        socket = Paths.under(Path(s.root), Path(DEFAULT_CONFIG)).auth_socket
        if len(bytes(socket)) > UNIX_PATH_MAX:
            problems.append(
                f"auth.listen_network: the socket path {socket} is longer "
                f"than the {UNIX_PATH_MAX} bytes a unix socket may have; use a "
                f"shorter root, or listen_network: tcp"
            )
    if s.registry.debug_addr:
        addrs["registry.debug_addr"] = s.registry.debug_addr
    addrs["auth.internal_addr"] = s.auth.internal_addr
    seen: dict[str, str] = {}
    for name, value in addrs.items():
        if value in seen:
            problems.append(f"{name}: {value} is also {seen[value]}; pick another port")
        seen[value] = name
    # nginx binds its ports on every listen address; an internal service on one of them
    # (registry.http_addr 127.0.0.1:5050 beside the default vhost on *:5050) fails to start.
    for name, value in addrs.items():
        host, _, port_text = value.rpartition(":")
        if not _PORT.fullmatch(port_text) or int(port_text) not in ports:
            continue
        host = host.strip("[]")
        if host in ("0.0.0.0", "::") or any(
            a in ("*", "[::]") or a.strip("[]") == host
            for a in s.nginx.listen_addresses
            if isinstance(a, str)
        ):
            problems.append(
                f"{name}: {value} is also {ports[int(port_text)]}, where nginx "
                f"listens; pick another port"
            )
    return problems


def _is_list_of_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# ---------------------------------------------------------------- derivation


def is_public_name(host: str) -> bool:
    """Let's Encrypt can only vouch for names the internet can resolve."""
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    return "." in host and not host.endswith(
        (".local", ".localhost", ".test", ".internal", ".example", ".invalid", ".lan", ".home.arpa")
    )


def registry_url_of(s: RawSettings) -> str:
    """The URL users docker login to: registry_external_url, else port 5050 of external_url's host.

    Validation and derive() both call this, so the port-clash and https checks judge the
    URL the recipes will actually serve.
    """
    host = urlsplit(s.external_url).hostname or "localhost"
    return s.registry_external_url or f"https://{f'[{host}]' if ':' in host else host}:5050"


def derive(
    s: RawSettings, config_file: Path | None = None, facts: HostFacts = HostFacts()
) -> Settings:  # noqa: B008 - frozen, shared safely
    """Fill in every value that follows from others: the resolved Settings, in which none
    of them is None. Pure: the host facts come in (`facts`, read by load()), and the
    input is left as it is."""
    root = Path(s.root)
    paths = Paths.under(root, config_file or Path(DEFAULT_CONFIG))
    host = urlsplit(s.external_url).hostname or "localhost"
    registry_url = registry_url_of(s)
    parts = urlsplit(registry_url)
    registry_host = parts.hostname or host
    registry_port = parts.port or 443
    own_domain = registry_host != host

    auth_enable = s.registry.enable if s.auth.enable is None else s.auth.enable
    rn = s.registry_nginx
    cert = rn.ssl_certificate or str(paths.ssl_dir / f"{registry_host}.crt")
    key = rn.ssl_certificate_key or str(paths.ssl_dir / f"{registry_host}.key")
    letsencrypt = s.letsencrypt.enable
    if letsencrypt is None:
        letsencrypt = (
            parts.scheme == "https" and not rn.ssl_certificate and is_public_name(registry_host)
        )

    def under_root(value: str | None, default: Path) -> str:
        return value or str(default)

    return resolved(
        Settings,
        s,
        registry_external_url=registry_url.rstrip("/"),
        registry=resolved(
            ResolvedRegistrySettings,
            s.registry,
            storage_path=under_root(s.registry.storage_path, paths.registry_dir / "data"),
            key_path=under_root(s.registry.key_path, paths.auth_dir / "token-signing.key"),
        ),
        registry_nginx=resolved(
            ResolvedRegistryNginxSettings,
            rn,
            enable=rn.enable and (s.registry.enable or auth_enable),
            listen_port=rn.listen_port or registry_port,
            ssl_certificate=cert,
            ssl_certificate_key=key,
        ),
        auth=resolved(
            ResolvedAuthSettings,
            s.auth,
            enable=auth_enable,
            database_path=under_root(s.auth.database_path, paths.auth_dir / "auth.db"),
        ),
        letsencrypt=resolved(ResolvedLetsEncryptSettings, s.letsencrypt, enable=letsencrypt),
        paths=paths,
        host=host,
        registry_host=registry_host,
        registry_port=registry_port,
        registry_on_own_domain=own_domain,
        token_realm=f"{registry_url.rstrip('/')}/jwt/auth",
        tls_mode="letsencrypt" if letsencrypt else "files" if rn.ssl_certificate else "self-signed",
        facts=facts,
    )


_Resolved = typing.TypeVar("_Resolved")


def resolved(cls: type[_Resolved], section: Any, **derived: Any) -> _Resolved:
    """`section`'s values as its resolved class `cls`, with the `derived` ones filled in.

    The resolved classes require every derived value, so one derive() forgets is a
    TypeError in every test, not a None a recipe meets later."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return cls(**{**values, **derived})


# ---------------------------------------------------------------- output


def _masked(key: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(key, v) for v in value]
    if is_sensitive(key) and value not in (None, "", [], {}):
        return "********"
    return value


def registry_address(s: Settings) -> str:
    """Where the registry answers: http_addr, or its socket path with listen_network:
    unix (also what reconfigure waits on and nginx's upstream names, `unix:` + path).
    Here rather than in a recipe: the registry's recipe and the token service's (whose
    tag rules ask the registry) both need it."""
    if s.registry.listen_network == "unix":
        return str(s.paths.registry_socket)
    return s.registry.http_addr


def sensitive_values(s: Settings) -> list[str]:
    """Every value show-config masks, as text: what the engine and the run log mask too,
    in whatever file or diff it turns up."""
    return sensitive_leaves(as_dict(s, mask=False))


def sensitive_leaves(tree: Any, rule: typing.Callable[[str], bool] = is_sensitive) -> list[str]:
    """The values, as text, under a key the rule calls sensitive, anywhere in a tree of
    dicts and lists (the settings, or a YAML/JSON file the engine is about to diff)."""
    found: list[str] = []

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(str(k), v)
        elif isinstance(value, list):
            for v in value:
                walk(key, v)
        elif rule(key) and value not in (None, ""):
            found.append(str(value).lower() if isinstance(value, bool) else str(value))

    walk("", tree)
    return found


def as_dict(s: Any, mask: bool = True) -> dict:
    """Settings as plain data (paths as strings), secrets masked unless mask=False."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value, mask)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = _masked(f.name, value) if mask else value
    return out


def to_yaml(s: Settings) -> str:
    return yaml.safe_dump(as_dict(s), sort_keys=False, default_flow_style=False)


def example_config() -> str:
    """The commented appliance.yml shipped as /etc/appliance/appliance.yml.

    Generated from the schema, so a key can never be documented but missing or the reverse.
    """
    lines = [
        "# appliance.yml - the one file that describes this registry host.",
        "# Every key is shown commented out with its default. Uncomment and edit, then run:",
        "#   sudo appliance-ctl reconfigure",
        "# Run `appliance-ctl show-config` to see the effective values.",
        "",
    ]
    _example_lines(RawSettings, "", lines)
    return "\n".join(lines) + "\n"


def _example_lines(cls: type, indent: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        text = f.metadata.get("doc", "")
        lines.append(f"# {indent}# {text}" if indent else f"## {text}")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"# {indent}{f.name}:")
            _example_lines(hints[f.name], indent + "  ", lines)
            lines.append("")
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        lines.extend(f"# {indent}{line}" for line in _dump({f.name: default}))
        if f.metadata.get("example") is not None:
            lines.append(f"# {indent}# for example:")
            lines.extend(f"# {indent}#   {line}" for line in _dump({f.name: f.metadata["example"]}))


def _dump(value: dict) -> list[str]:
    return (
        yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=1000)
        .rstrip("\n")
        .splitlines()
    )
