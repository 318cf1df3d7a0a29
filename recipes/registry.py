"""What the Distribution registry gets: its directories, the token bundle, its config
and its supervised program.

The registry has no reload, so its program is a wrapper (appliance/programs/registry.py)
that hands it over to a new process on SIGHUP without refusing a request or cutting a
transfer. A changed config, token bundle or program.json (environment, secrets to mask)
therefore notifies a reload; the supervisord program file names only the wrapper and
program.json, so it changes only when a path does. Disabled, the program file goes away
and the registry stops; the images stay on disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from appliance import registry_maintenance
from appliance.contracts import Service, signal
from appliance.engine import Report
from appliance.errors import ConfigError, ServiceError
from appliance.resources import Change, Directory, File, Resource, Template, reload
from appliance.secrets import Secrets
from appliance.settings import (
    STORAGE_EXTRAS,
    UNIX_PATH_MAX,
    Settings,
    is_sensitive,
    registry_address,
)
from recipes import supervisor
from recipes.auth import events_url
from recipes.base import service_user

# What the reference guide's Omnibus defaults are for an endpoint that leaves them out.
NOTIFICATION_DEFAULTS = {"timeout": "500ms", "threshold": 5, "backoff": "1s"}


def storage(settings: Settings) -> dict:
    """The registry's `storage` hash: the configured driver or the filesystem one, plus
    `delete` from storage_delete_enabled unless the hash sets it itself."""
    configured = dict(settings.registry.storage)
    drivers = [key for key in configured if key not in STORAGE_EXTRAS]
    out: dict = {}
    if drivers:
        out[drivers[0]] = dict(configured[drivers[0]] or {})
        if drivers[0] == "filesystem":
            out["filesystem"].setdefault("rootdirectory", settings.registry.storage_path)
    else:
        out["filesystem"] = {"rootdirectory": settings.registry.storage_path}
    out["delete"] = {"enabled": settings.registry.storage_delete_enabled}
    for extra in STORAGE_EXTRAS:
        if extra in configured:
            out[extra] = configured[extra]
    if settings.redis.url and "cache" not in configured:
        # Every node then shares what it learnt about blobs, and none serves a
        # descriptor another node's garbage collection has made stale for long.
        out["cache"] = {"blobdescriptor": "redis"}
    return out


def redis(settings: Settings) -> dict | None:
    """The registry's `redis` section (Distribution 2.8's shape: addr, password, db,
    timeouts, pool) from redis.url and redis.password_file; None without redis.url.

    The timeouts are short on purpose: the blob-descriptor cache is only a cache, and
    2.8 falls back to the storage when Redis does not answer, so a Redis that is down
    costs each request at most a dial timeout instead of hanging it."""
    url = settings.redis.url
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    out: dict = {
        "addr": f"{f'[{host}]' if ':' in host else host}:{parts.port or 6379}",
        "db": int(parts.path.strip("/") or 0),
        "dialtimeout": "1s",
        "readtimeout": "1s",
        "writetimeout": "1s",
        "pool": {"maxidle": 16, "maxactive": 64, "idletimeout": "300s"},
    }
    password = redis_password(settings)
    if password:
        out["password"] = password
    return out


def redis_password(settings: Settings) -> str | None:
    """The password in redis.password_file (its first line), None without one; a file
    that cannot be read is a ConfigError naming it."""
    path = settings.redis.password_file
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(
            f"redis.password_file: cannot read {path} ({reason}); write the Redis "
            f"password there, or remove the setting for a Redis without one."
        ) from None
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise ConfigError(
            f"redis.password_file: {path} is empty; write the Redis password on its first line."
        )
    return password


def readonly_storage(settings: Settings) -> dict:
    """The same storage, served read-only (a maintenance window): pulls work, pushes and
    deletes answer 405. Whatever `maintenance` the admin configured is kept."""
    out = storage(settings)
    out["maintenance"] = {**dict(out.get("maintenance") or {}), "readonly": {"enabled": True}}
    return out


def readonly_config(settings: Settings) -> Path:
    """The registry's config with read-only storage, beside its own: what the wrapper
    starts its children on while a maintenance window is open."""
    return settings.paths.registry_dir / "config-readonly.yml"


def filesystem_root(settings: Settings) -> Path | None:
    """Where the filesystem driver keeps images (None for the other drivers): the
    registry's account must own it, whichever key named it."""
    filesystem = storage(settings).get("filesystem")
    return Path(filesystem["rootdirectory"]) if filesystem else None


# Distribution 2.8 builds an endpoint's event filter only when some media type is ignored
# (notifications/sinks.go: `if len(ignored) == 0 { return sink }`), so an endpoint's
# `ignore: {actions: [pull]}` alone is silently dropped and every pull is still posted.
# Ignoring a media type no event carries makes 2.8 build the filter; later versions
# filter actions either way, and this type matches nothing in any of them.
NO_MEDIA_TYPE = "application/vnd.appliance.no-such-media-type"


def notifications(settings: Settings) -> list[dict]:
    endpoints = []
    for endpoint in settings.registry.notifications:
        rendered = {
            "name": endpoint["name"],
            "url": endpoint["url"],
            "headers": endpoint.get("headers", {}),
            **{key: endpoint.get(key, default) for key, default in NOTIFICATION_DEFAULTS.items()},
            **{
                key: endpoint[key]
                for key in ("disabled", "ignoredmediatypes", "ignore")
                if key in endpoint
            },
        }
        ignore = endpoint.get("ignore")
        if (
            isinstance(ignore, dict)
            and ignore.get("actions")
            and not ignore.get("mediatypes")
            and not endpoint.get("ignoredmediatypes")
        ):
            rendered["ignoredmediatypes"] = [NO_MEDIA_TYPE]
        endpoints.append(rendered)
    return endpoints


APPLIANCE_ENDPOINTS = ("appliance-events", "appliance-pulls")
BLOB_TYPE = "application/octet-stream"  # every blob event's media type in 2.8


def appliance_endpoints(settings: Settings, secrets: Secrets) -> list[dict]:
    """The auth service's own endpoints, beside the admin's (registry.notifications):
    `appliance-events` gets every push, delete and mount (manifests for the history,
    blobs for the usage figures), `appliance-pulls` the pulls of manifests only: a blob
    pull is sent to neither, so a pull storm costs one event per image, not per layer.
    The secret rides in the Authorization header; the wrapper masks it in the log."""
    if not settings.auth.enable:
        return []
    common = {
        "url": events_url(settings),
        "headers": {"Authorization": [f"Bearer {secrets.registry_events_secret}"]},
        "timeout": "2s",
        "threshold": 5,
        "backoff": "1s",
    }
    return [
        {
            "name": "appliance-events",
            **common,
            "ignoredmediatypes": [NO_MEDIA_TYPE],  # makes 2.8 apply `ignore` (above)
            "ignore": {"actions": ["pull"]},
        },
        {
            "name": "appliance-pulls",
            **common,
            "ignore": {"mediatypes": [BLOB_TYPE], "actions": ["push", "delete", "mount"]},
        },
    ]


def secret_values(settings: Settings, secrets: Secrets) -> list[str]:
    """Every secret the registry config and environment carry: http.secret, storage
    credentials, notification headers (they carry Authorization tokens) and registry.env
    values under secret-looking names (the rule show-config masks by)."""
    found = [secrets.registry_http_secret]
    if secrets.registry_events_secret:
        found.append(secrets.registry_events_secret)

    def walk(value: object, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif is_sensitive(key) and value not in (None, ""):
            found.append(str(value))

    walk(settings.registry.storage)
    password = redis_password(settings)
    if password:
        found.append(password)
    for endpoint in settings.registry.notifications:
        for values in (endpoint.get("headers") or {}).values():
            found.extend(str(v) for v in values)
    found.extend(
        str(v) for k, v in settings.registry.env.items() if is_sensitive(k) and v not in (None, "")
    )
    return found


# Go's collector runs when the heap has grown by GOGC percent since the last collection.
# bench/pull-storm measured the default (100) against 200 and 400 on a pull storm through
# nginx: see the README (Benchmarks) for the figures behind this choice. registry.env
# may set GOGC itself.
GOGC = "400"

# How long a registry that is handed over or stopped lets its transfers in flight finish
# (http.draintimeout); supervisord waits a little longer before it kills.
DRAIN_SECONDS = 30

# nginx's upstream keepalive for the registry (files/nginx/nginx.conf.j2 renders these):
# every upstream connection is closed by nginx at most KEEPALIVE_TIME_SECONDS after it
# was opened (at the end of a request), an idle one after KEEPALIVE_IDLE_SECONDS. A
# child whose socket path is gone therefore has no connection nginx could reuse after
# SETTLE_SECONDS, and the wrapper's stopping it cannot race a request nginx sends on one.
KEEPALIVE_TIME_SECONDS = 1
KEEPALIVE_IDLE_SECONDS = 2
SETTLE_SECONDS = KEEPALIVE_TIME_SECONDS + KEEPALIVE_IDLE_SECONDS + 0.5


def standby_address(settings: Settings) -> str | None:
    """The socket of the second registry process during a handover, beside the registry
    socket (the same directory nginx's workers may enter), either listen_network.

    None when the root is so deep that the path would not fit a unix socket (only
    possible with listen_network: tcp, the settings refuse such a root for unix): the
    wrapper then replaces the registry in place, draining the old process first, and
    requests that arrive in between are refused (README, Reliability).
    """
    path = settings.paths.registry_socket.with_name("standby.sock")
    return str(path) if len(bytes(path)) <= UNIX_PATH_MAX else None


def state_file(settings: Settings) -> Path:
    return settings.paths.registry_socket.with_name("handover.json")


def environment(settings: Settings) -> dict[str, str]:
    """The registry's environment: GOGC (unless registry.env sets it) and registry.env."""
    env = {"GOGC": GOGC}
    for key, value in settings.registry.env.items():
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def program_description(settings: Settings, secrets: Secrets) -> dict:
    """program.json, what the wrapper reads at its start and at every HUP."""
    return {
        "command": [settings.facts.registry_binary, "serve", str(settings.paths.registry_config)],
        "primary": address(settings),
        "standby": standby_address(settings),
        "environment": environment(settings),
        "secrets": secret_values(settings, secrets),
        "drain_seconds": DRAIN_SECONDS,
        "settle_seconds": SETTLE_SECONDS,
        "state_file": str(state_file(settings)),
        "readonly_command": [
            settings.facts.registry_binary,
            "serve",
            str(readonly_config(settings)),
        ],
        "maintenance_file": str(settings.paths.registry_maintenance),
    }


def handover_state(settings: Settings) -> dict:
    """What the wrapper last wrote: HUPs `requested`, the last `completed`, `phase`,
    `error`; zeros when it has written nothing yet."""
    try:
        return json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return {"requested": 0, "completed": 0, "phase": None, "error": None}


def wait_handed_over(settings: Settings, before: dict, timeout: float = DRAIN_SECONDS + 40) -> None:
    """After a HUP: return once the registry serves the new files on its own address
    (the old process gone; the standby retiring), or raise the reason it could not.

    `before` is handover_state() read before the HUP; the wait ends with the first
    handover taken after it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = handover_state(settings)
        if state.get("completed", 0) > before.get("requested", 0):
            if state.get("phase") == "failed":
                raise ServiceError(
                    f"the registry kept its running configuration: "
                    f"{state.get('error')}; see appliance-ctl tail registry."
                )
            return
        time.sleep(0.05)
    raise ServiceError(
        f"the registry was not handed over within {timeout:.0f} s; see appliance-ctl tail registry."
    )


def address(settings: Settings) -> str:
    """Where the registry answers (appliance.settings.registry_address)."""
    return registry_address(settings)


def is_loopback(address: str) -> bool:
    """Does host:port name a loopback address (127.0.0.0/8, ::1, localhost)?"""
    import ipaddress

    host = address.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def messages(settings: Settings, report: Report) -> list[str]:
    """The debug server answers without authentication, /debug/pprof/ included: warn
    (not refuse: a monitoring network may be the reason) when it is not on loopback."""
    debug = settings.registry.debug_addr
    if not settings.registry.enable or not debug or is_loopback(debug):
        return []
    return [
        f"Warning: registry.debug_addr {debug} is not a loopback address: whoever "
        f"reaches it reads /debug/vars, /metrics and /debug/pprof/ (profiles, goroutine "
        f"dumps) without signing in. Use 127.0.0.1:PORT unless a firewall guards it."
    ]


def service(settings: Settings) -> Service:
    """Distribution cannot reload, but its wrapper (appliance/programs/registry.py) hands
    it over to a new process on SIGHUP without refusing a request: a changed config is
    that signal, and so is `appliance-ctl restart registry`; the run waits until the
    new process serves (`wait_handed_over`)."""
    r = settings.registry
    binds = {
        address(settings): "registry.listen_network"
        if r.listen_network == "unix"
        else "registry.http_addr"
    }
    if r.debug_addr:
        binds[r.debug_addr] = "registry.debug_addr"
    p = settings.paths
    return Service(
        "registry",
        enabled=r.enable,
        reload=signal("HUP"),
        ready=address(settings),
        wait_after_reload=lambda pid: partial(wait_handed_over, settings, handover_state(settings)),
        graceful_restart="HUP",
        binds=binds,
        user=service_user(settings, r.username),
        reaches=(p.registry_config, filesystem_root(settings) or p.registry_dir),
        log=supervisor.service_log(settings, "registry"),
    )


@dataclass
class StaleMaintenanceWindow(Resource):
    """A maintenance marker whose owner is gone (a garbage collection killed inside its
    window) is removed, and the registry handed over again: it serves read-write after
    the next reconfigure whatever happened (its wrapper also hands itself back as soon as
    it sees the owner gone; the handover here is for a wrapper that did not)."""

    path: Path
    notifies: tuple = (reload("registry"),)
    kind: ClassVar[str] = "maintenance window"

    @property
    def name(self) -> str:
        return str(self.path)

    def current(self) -> registry_maintenance.Window | None:
        window = registry_maintenance.read(self.path)
        if registry_maintenance.state(window) == registry_maintenance.STALE:
            return window
        return None

    def plan(self, current: registry_maintenance.Window | None) -> list[Change]:
        if current is None:
            return []
        return [
            Change(
                f"remove: left by pid {current.pid} ({current.reason}), which is gone; "
                f"the registry serves read-write again"
            )
        ]

    def apply(self) -> None:
        registry_maintenance.remove(self.path)


def config_context(settings: Settings, secrets: Secrets) -> dict:
    r = settings.registry
    return {
        "log_level": r.log_level,
        "storage": storage(settings),
        "http_net": "unix" if r.listen_network == "unix" else None,
        "http_addr": address(settings),
        "http_secret": secrets.registry_http_secret,
        "debug_addr": r.debug_addr,
        "token_realm": settings.token_realm,
        "token_service": r.service,
        "token_issuer": r.issuer,
        "token_bundle": str(settings.paths.token_bundle),
        "notifications": notifications(settings) + appliance_endpoints(settings, secrets),
        "health_storagedriver_enabled": r.health_storagedriver_enabled,
        "compatibility_schema1_enabled": r.compatibility_schema1_enabled,
        "redis": redis(settings),
    }


def token_bundle_file(settings: Settings, secrets: Secrets) -> File:
    """The certificates of the token-signing key, from the same secrets entry the auth
    service signs with (the registry cannot trust a key other than the one in use), plus
    the next or previous key's while a rotation is under way or not yet finished."""
    return File(
        settings.paths.token_bundle,
        secrets.trusted_certificates(),
        0o644,
        notifies=(reload("registry"),),
    )


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    if not settings.registry.enable:
        return supervisor.disabled(settings, "registry")
    p = settings.paths
    user = service_user(settings, settings.registry.username)
    notify = (reload("registry"),)
    out: list[Resource] = [
        # root-owned, readable by the registry's group: it may read its config, not edit it.
        Directory(p.registry_dir, 0o750, group=user),
    ]
    data = filesystem_root(settings)
    if data is not None:
        out.append(Directory(data, 0o750, owner=user, group=user))
    # The registry socket (listen_network: unix), the standby socket of a handover and
    # the wrapper's state file. nginx's workers connect to the sockets, which takes write
    # permission on them: the registry creates its socket under umask 007 (the wrapper
    # makes the standby socket 0660), and the set-group-id directory hands them the web
    # server's group: nginx may connect, other local users may not even look.
    web_user = service_user(settings, settings.web_server.username)
    out.append(Directory(p.registry_socket.parent, 0o2750, owner=user, group=web_user))
    umask = "007" if settings.registry.listen_network == "unix" else None
    out += [
        token_bundle_file(settings, secrets),
        # It holds http.secret and storage credentials; the engine masks them in its diff.
        Template(
            p.registry_config,
            "registry/config.yml.j2",
            config_context(settings, secrets),
            mode=0o640,
            group=user,
            notifies=notify,
        ),
        # The same, read-only: the config of a maintenance window (garbage collection).
        Template(
            readonly_config(settings),
            "registry/config.yml.j2",
            {**config_context(settings, secrets), "storage": readonly_storage(settings)},
            mode=0o640,
            group=user,
            notifies=notify,
        ),
        StaleMaintenanceWindow(p.registry_maintenance),
        # Environment and the secrets the wrapper masks in the registry's log: a change
        # is a handover, not a restart of the program.
        File(
            program_file(settings),
            json.dumps(program_description(settings, secrets), indent=2) + "\n",
            0o640,
            group=user,
            sensitive=True,
            notifies=notify,
        ),
        *supervisor.program(
            settings,
            "registry",
            [
                supervisor.executable("python"),
                "-m",
                "appliance.programs.registry",
                str(program_file(settings)),
            ],
            user=user,
            stopsignal="TERM",
            stopwaitsecs=DRAIN_SECONDS + 10,
            umask=umask,
        ),
    ]
    return out


def program_file(settings: Settings) -> Path:
    return settings.paths.registry_dir / "program.json"
