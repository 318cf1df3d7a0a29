"""A real ACME server on loopback: Debian's pebble plus pebble-challtestsrv as its DNS.

Integration tests use it instead of Let's Encrypt::

    with PebbleServer(tmp_path, http01_port=port) as pebble:
        obtain_certificate(..., directory_url=pebble.directory_url,
                           ca_bundle=pebble.ca_bundle_path, ...)
        pebble.root_cert_pem()   # trust anchor for the issued chain

challtestsrv answers every A query with 127.0.0.1, so any name (`registry.test`) is
validated against 127.0.0.1:`http01_port`, where the caller serves the ACME webroot
(nginx, or `WebrootServer` below). Pebble's CA roots are new at each start: fetch them
from the running instance, never cache them. Start one per module or session: a start
takes a fraction of a second but issuance state (accounts, authorizations) is kept.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from appliance import pki
from tests.support.skopeo import Skopeo, SkopeoError

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
STARTUP_SECONDS = 15


def free_port() -> int:
    """A TCP port nobody listens on right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP: challtestsrv serves DNS on both."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class PebbleServer:
    """pebble + pebble-challtestsrv, started on enter and stopped on exit.

    Attributes once entered: `directory_url`, `ca_bundle_path` (the certificate of
    pebble's own HTTPS listener, for `verify_ssl`), `http01_port` (where pebble's VA
    fetches http-01 tokens), `management_url`, `challtestsrv_url`, `dns_port`,
    `log_path` (pebble's output).
    `cert_validity_seconds` sets how long issued certificates are valid (renewal tests).
    """

    def __init__(
        self,
        workdir: Path,
        http01_port: int | None = None,
        cert_validity_seconds: int | None = None,
        authz_reuse_percent: int = 0,
    ) -> None:
        self.workdir = Path(workdir)
        self.http01_port = http01_port if http01_port is not None else free_port()
        self.cert_validity_seconds = cert_validity_seconds
        self.authz_reuse_percent = authz_reuse_percent
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []

    def __enter__(self) -> PebbleServer:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        listener_key = pki.generate_private_key("ec-p256")
        listener_cert = pki.self_signed_certificate(listener_key, ["localhost", "127.0.0.1"])
        key_path = self.workdir / "pebble-listener.key"
        key_path.write_bytes(listener_key)
        self.ca_bundle_path = str(self.workdir / "pebble-listener.crt")
        Path(self.ca_bundle_path).write_bytes(listener_cert)

        self.dns_port = free_udp_and_tcp_port()
        challtest_management_port = free_port()
        self._spawn(
            "challtestsrv",
            [
                CHALLTESTSRV,
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{challtest_management_port}",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
            env={},
        )
        self.challtestsrv_url = f"http://127.0.0.1:{challtest_management_port}"

        acme_port, management_port = free_port(), free_port()
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": str(Path(self.ca_bundle_path)),
            "privateKey": str(key_path),
            "httpPort": self.http01_port,
            # Nothing listens there: tls-alpn-01 is never offered an answer.
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.cert_validity_seconds is not None:
            config["certificateValidityPeriod"] = self.cert_validity_seconds
        config_path = self.workdir / "pebble-config.json"
        config_path.write_text(json.dumps({"pebble": config}, indent=2))
        self.directory_url = f"https://127.0.0.1:{acme_port}/dir"
        self.management_url = f"https://127.0.0.1:{management_port}"
        self._spawn(
            "pebble",
            [PEBBLE, "-config", str(config_path), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            env={
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_WFE_NONCEREJECT": "0",
                "PEBBLE_AUTHZREUSE": str(self.authz_reuse_percent),
            },
        )
        self.log_path = self.workdir / "pebble.log"
        self._wait_until_ready()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self._logs.append(log)
        self._processes.append(
            subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                cwd=self.workdir,
            )
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited: {self._log_tails()}")
            try:
                self._get(self.challtestsrv_url + "/", tls=False, ok_statuses=(200, 404, 405))
                self._get(self.directory_url)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pebble not ready after {STARTUP_SECONDS}s: {self._log_tails()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self._processes):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()

    def root_cert_pem(self) -> bytes:
        """The root that signs issued chains (a new one at every pebble start)."""
        return self._get(self.management_url + "/roots/0")

    def intermediate_cert_pem(self) -> bytes:
        return self._get(self.management_url + "/intermediates/0")

    def set_a_record(self, host: str, address: str) -> None:
        """Make `host` resolve to `address` instead of 127.0.0.1 (a wrong-DNS scenario)."""
        body = json.dumps({"host": host, "addresses": [address]}).encode()
        request = urllib.request.Request(self.challtestsrv_url + "/add-a", data=body)
        with urllib.request.urlopen(request, timeout=5):
            pass

    def _get(self, url: str, tls: bool = True, ok_statuses: tuple[int, ...] = (200,)) -> bytes:
        context = ssl.create_default_context(cafile=self.ca_bundle_path) if tls else None
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code in ok_statuses:
                return error.read()
            raise

    def _log_tails(self) -> str:
        tails = []
        for path in sorted(self.workdir.glob("*.log")):
            tails.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(tails)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class WebrootServer(contextlib.AbstractContextManager["WebrootServer"]):
    """Serves a directory over plain HTTP on 127.0.0.1:`port`: the ACME webroot.

    Stands in for nginx's port-80 server in tests of the ACME client alone; the whole
    appliance's tests use real nginx.
    """

    def __init__(self, directory: Path, port: int) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebrootServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@dataclass
class NamedSkopeo(Skopeo):
    """skopeo resolving test names (`appliance.test`) through `hosts_file`.

    challtestsrv makes every name 127.0.0.1 for pebble; clients need the same without
    an /etc/hosts entry for the whole machine. skopeo runs in a private mount namespace
    (`unshare --mount`) where `hosts_file` is bind-mounted over /etc/hosts, so only that
    process sees the names, and the names stay the ones on the certificate.
    """

    hosts_file: Path | None = None

    def run(self, *args: str) -> subprocess.CompletedProcess:
        # Unprivileged, a user namespace grants the mount (not needed as root).
        userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        argv = [
            "unshare",
            *userns,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"',
            str(self.hosts_file),
            "skopeo",
            "--insecure-policy",
            *args,
        ]
        result = subprocess.run(
            argv, env=self.environment(), capture_output=True, text=True, timeout=self.timeout
        )
        if result.returncode != 0:
            raise SkopeoError(list(args), result)
        return result
