"""A real Distribution registry (`docker-registry serve`) that trusts the auth service.

Plain HTTP on loopback; its auth section is what the appliance's registry recipe
writes: realm = the token endpoint, service/issuer = the auth config's, rootcertbundle =
the token-signing certificate.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.auth.config import AuthConfig
from tests.support.auth_server import free_port


@dataclass
class Registry:
    directory: Path
    auth: AuthConfig
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> Registry:
        self.port = self.port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.directory / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address, "secret": "integration-test-secret"},
            "auth": {
                "token": {
                    "realm": self.auth.realm,
                    "service": self.auth.service,
                    "issuer": self.auth.issuer,
                    "rootcertbundle": str(self.auth.signing_certificate),
                }
            },
        }
        config_path = self.directory / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = open(self.directory / "registry.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log())
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1)
            except urllib.error.HTTPError as error:
                if error.code == 401:  # up, and asking for a token
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the registry did not start: {self.log()}")

    def log(self) -> str:
        return (self.directory / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
