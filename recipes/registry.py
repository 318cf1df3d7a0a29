"""What the Distribution registry gets: its directories, the token bundle, its config
and its supervised program.

A changed config or token bundle restarts the registry (it has no reload); a changed
program file (environment, address) is restarted by supervisord's update. Disabled, the
program file goes away and the registry stops; the images stay on disk.
"""

from __future__ import annotations

from pathlib import Path

from appliance.contracts import RESTART, Service
from appliance.engine import Report
from appliance.resources import Directory, File, Resource, Template, restart
from appliance.secrets import Secrets
from appliance.settings import STORAGE_EXTRAS, Settings
from recipes import supervisor
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
    return out


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
        rendered = {"name": endpoint["name"], "url": endpoint["url"],
                    "headers": endpoint.get("headers", {}),
                    **{key: endpoint.get(key, default)
                       for key, default in NOTIFICATION_DEFAULTS.items()},
                    **{key: endpoint[key] for key in ("disabled", "ignoredmediatypes", "ignore")
                       if key in endpoint}}
        ignore = endpoint.get("ignore")
        if isinstance(ignore, dict) and ignore.get("actions") and not ignore.get("mediatypes") \
                and not endpoint.get("ignoredmediatypes"):
            rendered["ignoredmediatypes"] = [NO_MEDIA_TYPE]
        endpoints.append(rendered)
    return endpoints


def address(settings: Settings) -> str:
    """Where the registry answers: http_addr, or the socket path, which is also what
    reconfigure waits on and what nginx's upstream names (`unix:` + path)."""
    if settings.registry.listen_network == "unix":
        return str(settings.paths.registry_socket)
    return settings.registry.http_addr


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
    return [f"Warning: registry.debug_addr {debug} is not a loopback address: whoever "
            f"reaches it reads /debug/vars, /metrics and /debug/pprof/ (profiles, goroutine "
            f"dumps) without signing in. Use 127.0.0.1:PORT unless a firewall guards it."]


def service(settings: Settings) -> Service:
    """The registry has no reload: a changed config is a restart."""
    r = settings.registry
    binds = {address(settings): "registry.listen_network" if r.listen_network == "unix"
             else "registry.http_addr"}
    if r.debug_addr:
        binds[r.debug_addr] = "registry.debug_addr"
    p = settings.paths
    return Service("registry", enabled=r.enable, reload=RESTART, ready=address(settings),
                   binds=binds, user=service_user(settings, r.username),
                   reaches=(p.registry_config, filesystem_root(settings) or p.registry_dir),
                   log=supervisor.service_log(settings, "registry"))


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
        "notifications": notifications(settings),
        "health_storagedriver_enabled": r.health_storagedriver_enabled,
        "compatibility_schema1_enabled": r.compatibility_schema1_enabled,
    }


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    if not settings.registry.enable:
        return supervisor.disabled(settings, "registry")
    p = settings.paths
    user = service_user(settings, settings.registry.username)
    notify = (restart("registry"),)
    out: list[Resource] = [
        # root-owned, readable by the registry's group: it may read its config, not edit it.
        Directory(p.registry_dir, 0o750, group=user),
    ]
    data = filesystem_root(settings)
    if data is not None:
        out.append(Directory(data, 0o750, owner=user, group=user))
    umask = None
    if settings.registry.listen_network == "unix":
        # nginx's workers connect to the socket, which takes write permission on it. The
        # registry creates it under umask 007, and the set-group-id directory hands it the
        # web server's group: nginx may connect, other local users may not even look.
        web_user = service_user(settings, settings.web_server.username)
        out.append(Directory(p.registry_socket.parent, 0o2750, owner=user, group=web_user))
        umask = "007"
    out += [
        # The certificate of the token-signing key, from the same secrets entry the auth
        # service signs with: the registry cannot trust a key other than the one in use.
        File(p.token_bundle, secrets.token_signing_certificate, 0o644, notifies=notify),
        # It holds http.secret and storage credentials; the engine masks them in its diff.
        Template(p.registry_config, "registry/config.yml.j2", config_context(settings, secrets),
                 mode=0o640, group=user, notifies=notify),
        *supervisor.program(settings, "registry",
                            [settings.facts.registry_binary, "serve", str(p.registry_config)],
                            user=user, environment=dict(settings.registry.env),
                            stopsignal="TERM", umask=umask),
    ]
    return out
