"""The real token service for tests: signing material, a config file, and
`appliance-auth` started as its own process on a free loopback port."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from appliance.auth import store as auth_store
from appliance.auth.config import AuthConfig, to_mapping
from appliance.auth.database import PostgresDatabase

APPLIANCE_AUTH = Path(sys.executable).with_name("appliance-auth")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_signing_material(directory: Path, kind: str = "ec") -> tuple[Path, Path]:
    """A token-signing key (EC P-256 or RSA-2048) and its self-signed certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance token signing")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"token-{kind}.key", directory / f"token-{kind}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


EVENTS_SECRET = "test-events-secret"


def make_config(directory: Path, port: int = 0, key_kind: str = "ec", **overrides) -> AuthConfig:
    key_path, cert_path = write_signing_material(directory / "pki", key_kind)
    port = port or free_port()
    values = dict(
        database=directory / "auth.db",
        database_password_file="",
        signing_key=key_path,
        signing_certificate=cert_path,
        issuer="appliance-token-issuer",
        service="container_registry",
        realm=f"http://127.0.0.1:{port}/jwt/auth",
        audit_log=directory / "audit.log",
        listen_addr=f"127.0.0.1:{port}",
        workers=2,
        # The values AuthConfig once defaulted to: the tests below were written against
        # them (a loopback peer's X-Real-IP believed, a 60 s credential cache).
        threads=4,
        token_lifetime=300,
        refresh_token_lifetime=2_592_000,
        trusted_proxies=("127.0.0.1", "::1"),
        rate_limit_window=300,
        rate_limit_user_failures=10,
        rate_limit_address_failures=30,
        rate_limit_account_failures=100,
        refresh_tokens_per_user=50,
        audit_log_max_bytes=50 * 1024 * 1024,
        audit_log_backups=10,
        credential_cache_ttl=60,
        credential_cache_size=10_000,
        default_registry_enabled=True,
        internal_addr=f"127.0.0.1:{free_port()}",
        events_secret_digest=hashlib.sha256(EVENTS_SECRET.encode()).hexdigest(),
        usage_file=directory / "registry-usage.json",
        gc_stats_file=directory / "registry-gc.json",
        registry_address="",
        maintenance_file=directory / "registry-maintenance.json",
    )
    values.update(overrides)
    database = values["database"]
    if isinstance(database, PostgresDatabase) and database.password_file is not None:
        values["database_password_file"] = str(database.password_file)  # as the recipe does
    config = AuthConfig(**values)
    auth_store.ensure_schema(config.database)
    return config


@dataclass
class AuthServer:
    """`appliance-auth --config` running in the background until stop()."""

    config: AuthConfig
    config_path: Path
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    """A command the server runs under (e.g. unshare, to give it its own mounts)."""

    @property
    def url(self) -> str:
        return f"http://{self.config.listen_addr}"

    def start(self, timeout: float = 20) -> AuthServer:
        self.config_path.write_text(json.dumps(to_mapping(self.config), indent=2))
        self.log_path = self.config_path.with_suffix(".log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                *self.prefix,
                str(APPLIANCE_AUTH),
                "--config",
                str(self.config_path),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"appliance-auth exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/-/health", timeout=1) as response:
                    if response.status == 200 and self._workers_ready():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"appliance-auth did not become healthy: {self.log_path.read_text()}")

    def _workers_ready(self) -> bool:
        text = self.log_path.read_text() if self.log_path else ""
        return text.count("Booting worker") >= self.config.workers

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
