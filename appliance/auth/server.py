"""`appliance-auth --config PATH`: the token service under gunicorn, in the foreground.

supervisord starts it and sends TERM to stop it. The application (key, certificate,
config) is loaded in the master before forking, so a broken key or config fails the
start with one clear line instead of crash-looping workers; each worker then opens its
own database connection on first use.

A HUP is the graceful reload that reconfigure sends when the config, key or certificate
changed: the master re-reads the config file and builds the application again, then
starts new workers on it while the old ones finish their requests (no request is
refused). A config that no longer loads is refused with one line in the log, and the
running application is kept: a bad file never takes the service down.

Worker model, measured on 2 cores with bench/token: gunicorn's threaded workers
(gthread), one process per core, a few threads each. The work is CPU-bound (ECDSA
signing, ~0.1 ms; argon2 only on a cold cache), so threads do not add throughput by
themselves; what they add is HTTP keep-alive, which sync workers lack: wrk, and nginx
with upstream keepalive, reuse connections instead of paying a TCP handshake and a
fresh accept per token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gunicorn.app.base import BaseApplication

from appliance.auth import config as auth_config
from appliance.auth.app import TokenService
from appliance.auth.store import check_schema
from appliance.errors import ApplianceError


class _Gunicorn(BaseApplication):
    def __init__(
        self,
        application: TokenService,
        options: dict,
        config_path: Path,
        reload_options: Callable[[auth_config.AuthConfig], dict],
    ) -> None:
        self.application, self.options = application, options
        self.config_path, self.reload_options = config_path, reload_options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn are skipped
                self.cfg.set(key, value)

    def reload(self) -> None:
        """On HUP (in the master): the config file again, then new workers fork from
        the application built on it (gunicorn's own reload re-uses the preloaded one)."""
        try:
            config = auth_config.load(self.config_path)
            check_schema(config.database)
            application = TokenService(config)
        except (ApplianceError, OSError, ValueError) as error:
            print(
                f"appliance-auth: reload refused, the running configuration is kept: {error}",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.application, self.options = application, self.reload_options(config)
            self.callable = None  # wsgi() hands out the new application
        super().reload()

    def load(self) -> TokenService:
        return self.application


def gunicorn_options(
    config: auth_config.AuthConfig, worker_class: str = "gthread", threads: int = 0
) -> dict:
    if config.listen_socket is not None:
        bind = f"unix:{config.listen_socket}"
    else:
        host = config.listen_host
        bind = f"[{host}]:{config.listen_port}" if ":" in host else f"{host}:{config.listen_port}"
    # The internal listener (the registry's events, metrics): loopback TCP, whichever
    # network nginx's listener is on; the application tells the two apart by the socket
    # a request came in on.
    host, port = config.internal_host, config.internal_port
    internal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": [bind, internal],
        # gunicorn creates a unix socket under this umask, then hands it to the service's
        # own group: nginx's account is "other" to it, so the socket is 0777 and its
        # directory (0750, nginx's group) is what keeps every other account out.
        "umask": 0,
        "workers": config.workers,
        "worker_class": worker_class,
        "threads": threads or config.threads,
        "preload_app": True,
        "proc_name": "appliance-auth",
        "accesslog": None,  # the audit log records every token request
        "errorlog": "-",
        "loglevel": "info",
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 30,  # nginx keeps upstream connections open (gthread honours it)
        "backlog": 2048,
        # gunicorn >= 25 opens a control socket under $HOME by default: nothing uses it,
        # and two instances on one host would fight over the path.
        "control_socket_disable": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="appliance-auth", description="Run the registry token service in the foreground."
    )
    parser.add_argument("--config", required=True, type=Path, help="JSON config file")
    parser.add_argument(
        "--worker-class",
        default="gthread",
        choices=("sync", "gthread"),
        help=argparse.SUPPRESS,  # for bench/token: the production model is gthread
    )
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = auth_config.load(args.config)
        check_schema(config.database)
        application = TokenService(config)
    except ApplianceError as error:
        print(f"appliance-auth: {error}", file=sys.stderr)
        return 2

    def options(loaded: auth_config.AuthConfig) -> dict:
        return gunicorn_options(loaded, args.worker_class, args.threads)

    _Gunicorn(application, options(config), args.config, options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
