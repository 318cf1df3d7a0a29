"""A whole appliance under a temporary root, on free loopback ports.

`ApplianceUnderTest` writes an appliance.yml, runs the real `appliance-ctl` (the
console script of the virtualenv) and tears supervisord and every service down at the
end. Run as root (CI), reconfigure creates the service accounts and runs each service
under its own, exactly as on a real host; the temporary root is therefore made
traversable (0755) rather than pytest's private 0700 directories.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.support.skopeo import Skopeo

BIN = Path(sys.prefix) / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class ApplianceUnderTest:
    root: Path
    config: dict
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))

    @classmethod
    def create(cls, extra: dict | None = None, prefix: str = "appliance-") -> ApplianceUnderTest:
        root = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(root, 0o755)
        port = free_port()
        config = {
            "root": str(root),
            "external_url": "https://localhost",
            "registry_external_url": f"https://localhost:{port}",
            "nginx": {
                "http_port": free_port(),
                "listen_addresses": ["127.0.0.1"],
                "worker_processes": "2",
            },
            "registry": {"http_addr": f"127.0.0.1:{free_port()}"},
            "auth": {
                "listen_addr": f"127.0.0.1:{free_port()}",
                "internal_addr": f"127.0.0.1:{free_port()}",
            },
        }
        appliance = cls(root=root, config=deep_merge(config, extra or {}))
        appliance.config.setdefault("initial_root_password", appliance.password)
        appliance.password = appliance.config["initial_root_password"]
        appliance.write_config()
        return appliance

    @property
    def config_file(self) -> Path:
        return self.root / "etc/appliance/appliance.yml"

    def write_config(self, changes: dict | None = None) -> None:
        if changes:
            self.config = deep_merge(self.config, changes)
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @property
    def registry_address(self) -> str:
        url = self.config["registry_external_url"]
        return url.split("://", 1)[1].rstrip("/")

    @property
    def host(self) -> str:
        return self.registry_address.rsplit(":", 1)[0]

    @property
    def certificate(self) -> Path:
        return self.root / f"etc/appliance/ssl/{self.host}.crt"

    def token(self, scope: str) -> str:
        """A bearer token for root from the token service, through the TLS vhost."""
        import base64
        import json
        import ssl
        import urllib.request

        credentials = base64.b64encode(f"root:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"https://{self.registry_address}/jwt/auth?service=container_registry&scope={scope}",
            headers={"Authorization": f"Basic {credentials}"},
        )
        context = ssl.create_default_context(cafile=str(self.certificate))
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return json.load(reply)["token"]

    def ctl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "appliance-ctl"), "-c", str(self.config_file), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"appliance-ctl {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def reconfigure(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ctl("reconfigure", *args, check=check)

    def skopeo(
        self, home: Path, username: str | None = "root", password: str | None = None
    ) -> Skopeo:
        cert_dir = home / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.certificate, cert_dir / "ca.crt")
        return Skopeo(
            home=home,
            registry=self.registry_address,
            username=username,
            password=password
            if password is not None
            else (self.password if username == "root" else None),
            cert_dir=cert_dir,
        )

    def pids(self) -> dict[str, int]:
        """Service name -> pid, from `appliance-ctl status`."""
        out = {}
        for line in self.ctl("status", check=False).stdout.splitlines():
            if line.startswith("run: "):
                name = line.split(":")[1].strip()
                out[name] = int(line.split("(pid ")[1].split(")")[0])
        return out

    def wait_until_running(
        self, services: tuple[str, ...] = ("nginx", "registry", "auth"), timeout: float = 20
    ) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if all(s in pids for s in services):
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"services not running after {timeout}s: "
                    f"{self.ctl('status', check=False).stdout}"
                )
            time.sleep(0.2)

    def kill_and_wait_back(self, service: str, timeout: float = 20) -> int:
        """kill -9 the service, as a crash or the OOM killer would; its new pid once
        supervisord has started it again."""
        killed = self.wait_until_running()[service]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            pid = self.pids().get(service)
            if pid not in (None, killed):
                return pid
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{service} did not come back: {self.ctl('status', check=False).stdout}"
                )
            time.sleep(0.2)

    @property
    def registry_internal_address(self) -> str:
        """Where nginx reaches the registry: http_addr, or its socket (listen_network)."""
        from appliance.settings import Paths

        if self.config["registry"].get("listen_network") == "unix":
            return str(Paths.under(self.root, self.config_file).registry_socket)
        return self.config["registry"]["http_addr"]

    @property
    def auth_internal_address(self) -> str:
        """Where nginx reaches the token service: its socket (auth.listen_network: unix,
        the default) or listen_addr."""
        from appliance.settings import Paths

        if self.config["auth"].get("listen_network", "unix") == "unix":
            return str(Paths.under(self.root, self.config_file).auth_socket)
        return self.config["auth"]["listen_addr"]

    def registry_process(self) -> int:
        """The registry process serving on its address: a child of the `registry`
        program's wrapper, which hands it over to a new one on a change."""
        import json

        state = self.root / "var/opt/appliance/registry-socket/handover.json"
        return json.loads(state.read_text())["children"][self.registry_internal_address]

    def wait_listening(self, timeout: float = 20) -> None:
        """Until nginx, the registry and the token service all accept connections."""
        from appliance.reconfigure import wait_listening

        port = self.registry_address.rsplit(":", 1)[1]
        wait_listening(
            {
                "nginx": f"127.0.0.1:{port}",
                "registry": self.registry_internal_address,
                "auth": self.auth_internal_address,
            },
            timeout,
        )

    def shutdown(self) -> None:
        from appliance.services import Supervisor

        paths_root = self.root / "var/opt/appliance/supervisor"
        supervisor = Supervisor(paths_root / "supervisord.conf", paths_root / "supervisor.sock")
        try:
            if supervisor.is_running():
                supervisor.shutdown()
        finally:
            pidfile = paths_root / "supervisord.pid"
            deadline = time.monotonic() + 15
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def destroy(self) -> None:
        try:
            self.shutdown()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def team_app_appliance(prefix: str, members: dict[str, tuple[str, str]]):
    """A running appliance (deletes enabled) with the project team/app and its members
    (username: (password, role)), destroyed after: what the API and page tests share."""
    appliance = ApplianceUnderTest.create(
        {"registry": {"storage_delete_enabled": True}}, prefix=prefix
    )
    try:
        appliance.reconfigure()
        appliance.wait_listening()
        appliance.ctl("project", "create", "team/app")
        for name, (password, _) in members.items():
            appliance.ctl("user", "create", name, "--password-stdin", input=password + "\n")
        for name, (_, role) in members.items():
            appliance.ctl("member", "add", "team/app", name, role)
        yield appliance
    finally:
        appliance.destroy()
