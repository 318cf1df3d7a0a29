"""What nginx gets: its prefix (temp and pid files), one config file
checked with `nginx -t` before it replaces the running one, and its supervised program.

Every change of the config is applied by a reload (HUP): nginx re-reads its config and
certificates and lets old workers finish their transfers, so a push in flight survives a
reconfigure. The TLS recipe's certificate files notify the same reload; it also owns the
ACME webroot served on the HTTP port. The nginx master runs as whoever runs supervisord
(root on a host, to bind 443 and read the TLS keys); its workers run as the web server
account.
"""

from __future__ import annotations

import subprocess
import time
from functools import partial
from pathlib import Path

from appliance.auth.tag_rules import PASSED
from appliance.contracts import Service
from appliance.contracts import signal as reload_signal
from appliance.errors import ResourceError, ServiceError
from appliance.resources import Directory, Resource, Template, reload
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import supervisor
from recipes.auth import address as auth_address
from recipes.base import service_user
from recipes.registry import KEEPALIVE_IDLE_SECONDS, KEEPALIVE_TIME_SECONDS, standby_address
from recipes.registry import address as registry_address

NGINX_BINARY = "/usr/sbin/nginx"  # Debian's nginx-light

# Read and write size for proxied bodies in both directions. nginx's page-sized default
# (4-8 KiB) costs a syscall and a TLS record per few kilobytes; bench/push measured this.
BUFFER_SIZE = "64k"

# Outside /v2/ a request body is a token request's form (a refresh token and a few
# scopes: well under 4 KiB); 64k leaves room for many scopes and refuses anything that
# is not a form. The client timeouts bound how long a slow client may hold a request
# open while nginx reads it; blob transfers under /v2/ keep registry_nginx.proxy_timeout.
SMALL_BODY_MAX = "64k"
CLIENT_TIMEOUT = 10

# The tag rules' answer that sends a manifest write on to the registry (tag_gate.PASSED),
# and the memory a manifest body is read into (the registry's limit: 4 MiB), so that the
# same body can go to the token service and then to the registry.
TAG_RULES_PASSED = PASSED
MANIFEST_BUFFER = "4m"


def prefix(settings: Settings) -> Path:
    return settings.paths.nginx_dir


def temp_dir(settings: Settings) -> Path:
    """Root-owned parent of the worker-owned temporary directories (Debian's
    /var/lib/nginx). Not `tmp/`, the name of the worker-owned parent of earlier
    releases: a symlink left in there is never followed by the root master."""
    return settings.paths.nginx_dir / "temp"


def pid_file(settings: Settings) -> Path:
    return prefix(settings) / "nginx.pid"


def listen_address(address: str, port: int) -> str:
    """nginx's listen argument for one of nginx.listen_addresses."""
    if address == "*":
        return f"*:{port}"
    if address.startswith("["):
        return f"{address}:{port}"
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def upstream_address(address: str) -> str:
    """Where nginx connects to reach a service told to listen on `address` (host:port).

    The registry (Go) and the token service (gunicorn) bind a single IPv4 address for a
    host name, while nginx connects to every address the name resolves to. On a stock
    Debian /etc/hosts `localhost` (the guide's own example, localhost:5001) resolves to
    ::1 first, where nothing listens: requests meet refused connections, logged as
    errors. So `localhost` becomes the address the services actually bind.
    """
    if address.startswith("/"):
        return f"unix:{address}"
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host.lower() == "localhost" else address


def config_context(settings: Settings) -> dict:
    p = settings.paths
    n, rn = settings.nginx, settings.registry_nginx
    registry = None
    if rn.enable:
        registry = {
            "listen": [listen_address(a, rn.listen_port) for a in n.listen_addresses],
            "server_name": settings.registry_host,
            "ssl_certificate": rn.ssl_certificate,
            "ssl_certificate_key": rn.ssl_certificate_key,
            # Either may be off: the vhost of a token service for an external registry
            # (registry.enable: false, auth.enable: true) serves /jwt/auth alone.
            # The registry's own address and the standby socket of a handover
            # (appliance/programs/registry.py): nginx passes a request refused by one to
            # the other, and keeps upstream connections short enough to let one retire.
            "upstream": upstream_address(registry_address(settings))
            if settings.registry.enable
            else None,
            "standby_upstream": upstream_address(standby_address(settings))
            if settings.registry.enable and standby_address(settings)
            else None,
            "keepalive_time": KEEPALIVE_TIME_SECONDS,
            "keepalive_idle": KEEPALIVE_IDLE_SECONDS,
            "auth_upstream": upstream_address(auth_address(settings))
            if settings.auth.enable
            else None,
            "proxy_timeout": rn.proxy_timeout,
            "hsts_max_age": rn.hsts_max_age,
            # Manifest writes pass the tag rules of the token service first, when both run.
            "tag_rules": settings.registry.enable and settings.auth.enable,
            "tag_rules_passed": TAG_RULES_PASSED,
            "manifest_buffer": MANIFEST_BUFFER,
        }
    return {
        "user": service_user(settings, settings.web_server.username),
        "worker_processes": n.worker_processes,
        "pid_file": str(pid_file(settings)),
        "temp_dir": str(temp_dir(settings)),
        "acme_webroot": str(p.acme_webroot),
        "ssl_protocols": rn.ssl_protocols,  # checked word by word in settings
        "buffer_size": BUFFER_SIZE,
        "small_body_max": SMALL_BODY_MAX,
        "client_timeout": CLIENT_TIMEOUT,
        "registry": registry,
        "http_listen": [listen_address(a, n.http_port) for a in n.listen_addresses],
        "redirect_url": settings.registry_external_url
        if rn.enable and n.redirect_http_to_https
        else None,
    }


def command(settings: Settings, config: Path) -> list[str]:
    # -e stderr: nginx opens its error log before reading the config; the compiled-in
    # path of other builds (/var/log/nginx/error.log) is not writable by an ordinary user.
    return [NGINX_BINARY, "-e", "stderr", "-p", str(prefix(settings)), "-c", str(config)]


def check_config(settings: Settings):  # noqa: ANN201 - returns the File.verify callback
    """`nginx -t` on the new file before it replaces the live one: a config nginx would
    refuse never reaches a reload, and the running nginx keeps serving the old one."""

    def verify(candidate: Path) -> None:
        result = subprocess.run(
            [*command(settings, candidate), "-t", "-q"], capture_output=True, text=True
        )
        if result.returncode != 0:
            problem = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
            raise ResourceError(
                f"nginx refused the new configuration, the running one is kept: {problem}"
            )

    return verify


def bind_address(address: str, port: int) -> str:
    """host:port as a listener is looked up ('*' binds every address)."""
    return f":{port}" if address == "*" else listen_address(address, port)


def service(settings: Settings) -> Service:
    """nginx reloads on HUP without dropping connections, and the run waits until the
    workers of the old configuration stopped taking connections."""
    n, rn = settings.nginx, settings.registry_nginx
    binds = {bind_address(a, n.http_port): "nginx.http_port" for a in n.listen_addresses}
    if rn.enable:
        binds |= {
            bind_address(a, rn.listen_port): "registry_nginx.listen_port"
            for a in n.listen_addresses
        }
    first = n.listen_addresses[0]
    host = "127.0.0.1" if first in ("*", "[::]") else first
    port = rn.listen_port if rn.enable else n.http_port
    return Service(
        "nginx",
        reload=reload_signal("HUP"),
        ready=listen_address(host, port),
        wait_after_reload=lambda master: partial(wait_reloaded, worker_pids(master)),
        binds=binds,
        user=service_user(settings, settings.web_server.username),
        reaches=(settings.paths.acme_webroot, temp_dir(settings)),
        log=supervisor.service_log(settings, "nginx"),
        pid_file=pid_file(settings),
    )


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    p = settings.paths
    config = p.nginx_config
    return [
        Directory(prefix(settings), 0o755),
        Directory(config.parent, 0o755),
        # Workers write request and response bodies in sub-directories that the root
        # master creates at start and hands to the worker account; the parent stays
        # root's (0755), so the worker can neither replace a sub-directory by a symlink
        # nor add one that the master would chown through.
        Directory(temp_dir(settings), 0o755, owner=service_user(settings, "root")),
        Template(
            config,
            "nginx/nginx.conf.j2",
            config_context(settings),
            mode=0o644,
            verify=check_config(settings),
            notifies=(reload("nginx"),),
        ),
        # The program retires a killed master's orphaned workers first, then becomes
        # nginx: see appliance/programs/nginx.py.
        *supervisor.program(
            settings,
            "nginx",
            [
                supervisor.executable("python"),
                "-m",
                "appliance.programs.nginx",
                str(pid_file(settings)),
                *command(settings, config),
                "-g",
                "daemon off;",
            ],
            user=None,
            stopsignal="QUIT",
        ),
    ]


def worker_pids(master: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []


def wait_reloaded(old_workers: list[int], timeout: float = 5.0) -> None:
    """Return once the workers from before a HUP stopped taking new connections.

    nginx answers a HUP by starting new workers, then tells the old ones to finish;
    until they are told (about 100 ms), they still accept connections and proxy them by
    the old configuration - to an upstream address that may be gone. A caller that
    reloaded for a new upstream must not report success before that window closes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = []
        for pid in old_workers:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # gone
            if b"shutting down" not in title and title:
                serving.append(pid)
        if not serving:
            return
        old_workers = serving
        time.sleep(0.02)
    raise ServiceError(
        f"nginx was reloaded, but its workers of the previous configuration "
        f"(pids {', '.join(map(str, old_workers))}) still take connections "
        f"after {timeout:g} s; see appliance-ctl tail nginx."
    )
