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

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import ResourceError
from appliance.programs.registry import KEEPALIVE_IDLE_SECONDS, KEEPALIVE_TIME_SECONDS
from appliance.resources import Directory, Resource, Template, reload
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import supervisor
from recipes.base import service_user
from recipes.registry import address as registry_address
from recipes.registry import standby_address

NGINX_BINARY = "/usr/sbin/nginx"  # Debian's nginx-light

# Read and write size for proxied bodies in both directions. nginx's page-sized default
# (4-8 KiB) costs a syscall and a TLS record per few kilobytes; bench/push measured this.
BUFFER_SIZE = "64k"


def prefix(settings: Settings) -> Path:
    return settings.paths.nginx_dir


def temp_dir(settings: Settings) -> Path:
    return settings.paths.nginx_dir / "tmp"


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
            if settings.registry.enable else None,
            "standby_upstream": upstream_address(standby_address(settings))
            if settings.registry.enable and standby_address(settings) else None,
            "keepalive_time": KEEPALIVE_TIME_SECONDS,
            "keepalive_idle": KEEPALIVE_IDLE_SECONDS,
            "auth_upstream": upstream_address(settings.auth.listen_addr)
            if settings.auth.enable else None,
            "proxy_timeout": rn.proxy_timeout,
        }
    return {
        "user": service_user(settings, settings.web_server.username),
        "worker_processes": n.worker_processes,
        "pid_file": str(pid_file(settings)),
        "temp_dir": str(temp_dir(settings)),
        "acme_webroot": str(p.acme_webroot),
        "ssl_protocols": rn.ssl_protocols,  # checked word by word in settings
        "buffer_size": BUFFER_SIZE,
        "registry": registry,
        "http_listen": [listen_address(a, n.http_port) for a in n.listen_addresses],
        "redirect_url": settings.registry_external_url
        if rn.enable and n.redirect_http_to_https else None,
    }


def command(settings: Settings, config: Path) -> list[str]:
    # -e stderr: nginx opens its error log before reading the config; the compiled-in
    # path of other builds (/var/log/nginx/error.log) is not writable by an ordinary user.
    return [NGINX_BINARY, "-e", "stderr", "-p", str(prefix(settings)), "-c", str(config)]


def check_config(settings: Settings):  # noqa: ANN201 - returns the File.verify callback
    """`nginx -t` on the new file before it replaces the live one: a config nginx would
    refuse never reaches a reload, and the running nginx keeps serving the old one."""

    def verify(candidate: Path) -> None:
        result = subprocess.run([*command(settings, candidate), "-t", "-q"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            problem = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
            raise ResourceError(f"nginx refused the new configuration, the running one is "
                                f"kept: {problem}")

    return verify


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    p = settings.paths
    web_user = service_user(settings, settings.web_server.username)
    config = p.nginx_config
    return [
        Directory(prefix(settings), 0o755),
        Directory(config.parent, 0o755),
        # Workers write request and response bodies here (root creates the sub-directories
        # at start and hands them to the worker account).
        Directory(temp_dir(settings), 0o700, owner=web_user, group=web_user),
        Template(config, "nginx/nginx.conf.j2", config_context(settings), mode=0o644,
                 verify=check_config(settings), notifies=(reload("nginx"),)),
        *supervisor.program(settings, "nginx",
                            [supervisor.executable("python"), "-m", "recipes.nginx",
                             str(pid_file(settings)), *command(settings, config),
                             "-g", "daemon off;"],
                            user=None, stopsignal="QUIT"),
    ]


# ---------------------------------------------------------------- the nginx program
# A master killed outright (kill -9, the OOM killer) leaves its workers running: they
# keep the listening sockets, so the master supervisord starts next cannot bind
# ("Address already in use") and nginx stays down while the orphans go on serving the
# old configuration. The program therefore starts as `python -m recipes.nginx PID_FILE
# NGINX...`: it retires the dead master's workers, then becomes nginx (same pid, so
# supervisord's HUP and QUIT reach the master).


def orphaned_workers(pid_file: Path) -> list[int]:
    """nginx processes left in the process group of a master that is gone.

    supervisord makes each program a process group leader, so the group id is the dead
    master's pid, the one its pid file still holds. Linux reuses no pid that is still a
    group id, so what is found in that group is the orphans; while that pid is alive,
    nothing is touched.
    """
    try:
        master = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return []
    processes = {}  # pid -> (name, state, process group)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # state, ppid, pgrp, ...
        processes[int(stat.parent.name)] = (text[text.find("(") + 1:text.rfind(")")],
                                            fields[0], int(fields[2]))
    if master in processes and processes[master][1] not in "ZX":
        return []  # the master lives: those are its workers
    return [pid for pid, (name, _, group) in processes.items()
            if group == master and pid != master and name == "nginx"]


def retire_orphaned_workers(pid_file: Path, timeout: float = 5.0) -> None:
    """QUIT the orphans (they finish their transfers), KILL what is left at `timeout`."""
    workers = orphaned_workers(pid_file)
    deadline = time.monotonic() + timeout
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        for pid in workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while workers and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        if not workers:
            return


def main(argv: list[str]) -> None:
    pid_path, nginx = Path(argv[0]), argv[1:]
    retire_orphaned_workers(pid_path)
    os.execv(nginx[0], nginx)


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


if __name__ == "__main__":
    main(sys.argv[1:])
