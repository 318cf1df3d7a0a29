"""A client that counts: token requests, pushes and pulls in a loop through nginx TLS,
each answer judged as a user would (a 5xx, a refused or cut connection is a failure).

Started before a change and stopped after it, it tells whether the change cost any
request: `failures` lists what went wrong, with the time it happened.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

from tests.support.appliance import ApplianceUnderTest

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


# What real clients do when a server closes an idle keep-alive connection just as a
# request goes out on it, which every HTTP server does when it reloads (nginx's old
# workers close their idle client connections at once): Go's net/http (docker,
# containerd, skopeo) sends a GET or HEAD that got no byte of answer on a reused
# connection again on a new one, and docker's push sends its registry requests again
# (it retries a failed layer or manifest push); the registry's POST (a new upload
# session) and PUT (content addressed by its digest) are safe to send twice. Only nginx
# closes a client's connection unanswered, so this hides no registry fault: a registry
# handed over mid-request shows as a 502, which counts. Anything else counts too.
RETRIED_METHODS = ("GET", "HEAD", "POST", "PUT")
CLOSED_UNANSWERED = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ssl.SSLEOFError,
)


class Connection:
    """One keep-alive connection that retries as a real client does (RETRIED_METHODS)."""

    def __init__(self, connect) -> None:  # noqa: ANN001 - returns an HTTPSConnection
        self.connect, self.conn, self.used = connect, connect(), 0

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        reused = self.used > 0
        self.used += 1
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            return self.conn.getresponse()
        except CLOSED_UNANSWERED:
            if not (reused and method in RETRIED_METHODS):
                raise
            self.reset()
            self.used += 1
            self.conn.request(method, path, body=body, headers=headers or {})
            return self.conn.getresponse()

    def reset(self) -> None:
        self.conn.close()
        self.conn, self.used = self.connect(), 0

    def close(self) -> None:
        self.conn.close()


@dataclass
class Registry:
    """HTTP/1.1 to the appliance's registry vhost, one keep-alive connection per use."""

    appliance: ApplianceUnderTest

    def connection(self, timeout: float = 60) -> http.client.HTTPSConnection:
        host, port = self.appliance.registry_address.rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(self.appliance.certificate))
        return http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)

    def token_path(self, repository: str) -> str:
        return f"/jwt/auth?service=container_registry&scope=repository:{repository}:pull,push"

    def basic(self) -> dict[str, str]:
        credentials = f"root:{self.appliance.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    def client(self) -> Connection:
        return Connection(self.connection)

    def token(self, conn: Connection, repository: str) -> str:
        reply = conn.request("GET", self.token_path(repository), headers=self.basic())
        body = reply.read()
        if reply.status != 200:
            raise AssertionError(f"token: {reply.status} {body[:200]!r}")
        return json.loads(body)["token"]

    def push_blob(self, conn: Connection, token: str, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        auth = {"Authorization": f"Bearer {token}"}
        reply = conn.request("POST", f"/v2/{repository}/blobs/uploads/", headers=auth)
        reply.read()
        if reply.status != 202:
            raise AssertionError(f"POST upload: {reply.status}")
        location = reply.getheader("Location")
        path = location.split("://", 1)[-1]
        path = path[path.index("/") :] if not location.startswith("/") else location
        reply = conn.request(
            "PUT",
            f"{path}{'&' if '?' in path else '?'}digest={digest}",
            body=data,
            headers={**auth, "Content-Type": "application/octet-stream"},
        )
        reply.read()
        if reply.status != 201:
            raise AssertionError(f"PUT blob: {reply.status}")
        return digest

    def push_image(
        self, conn: Connection, token: str, repository: str, tag: str, layer: bytes
    ) -> None:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        config_digest = self.push_blob(conn, token, repository, config)
        layer_digest = self.push_blob(conn, token, repository, layer)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        reply = conn.request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            body=manifest,
            headers={"Authorization": f"Bearer {token}", "Content-Type": MANIFEST_TYPE},
        )
        reply.read()
        if reply.status != 201:
            raise AssertionError(f"PUT manifest: {reply.status}")

    def pull_image(self, conn: Connection, token: str, repository: str, tag: str) -> bytes:
        """The manifest, then every blob it names; the layer's bytes."""
        auth = {"Authorization": f"Bearer {token}"}
        reply = conn.request(
            "GET", f"/v2/{repository}/manifests/{tag}", headers={**auth, "Accept": MANIFEST_TYPE}
        )
        body = reply.read()
        if reply.status != 200:
            raise AssertionError(f"GET manifest: {reply.status}")
        manifest = json.loads(body)
        data = b""
        for blob in [manifest["config"], *manifest["layers"]]:
            reply = conn.request("GET", f"/v2/{repository}/blobs/{blob['digest']}", headers=auth)
            data = reply.read()
            if (
                reply.status != 200
                or "sha256:" + hashlib.sha256(data).hexdigest() != blob["digest"]
            ):
                raise AssertionError(f"GET blob: {reply.status}, {len(data)} bytes")
        return data


@dataclass
class CountingClient:
    """Token, push and pull loops on threads until stop(); counts every request."""

    appliance: ApplianceUnderTest
    threads: int = 2
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> CountingClient:
        registry = Registry(self.appliance)
        for number in range(self.threads):
            for loop in (self._tokens, self._push_and_pull):
                worker = threading.Thread(target=loop, args=(registry, number), daemon=True)
                worker.start()
                self._workers.append(worker)
        return self

    def stop(self) -> CountingClient:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        return self

    def _count(self, error: BaseException | None) -> None:
        with self._lock:
            self.done += 1
            if error is not None:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {error!r}")

    def _run(self, registry: Registry, step) -> None:  # noqa: ANN001 - a callable
        conn = registry.client()
        while not self._stop.is_set():
            try:
                step(conn)
                self._count(None)
            except (OSError, http.client.HTTPException, AssertionError) as error:
                self._count(error)
                conn.reset()
        conn.close()

    def _tokens(self, registry: Registry, number: int) -> None:
        self._run(registry, lambda conn: registry.token(conn, f"root/counting-{number}"))

    def _push_and_pull(self, registry: Registry, number: int) -> None:
        repository = f"root/counting-{number}"

        def step(conn: Connection) -> None:
            token = registry.token(conn, repository)
            layer = os.urandom(64 * 1024)
            registry.push_image(conn, token, repository, "latest", layer)
            if registry.pull_image(conn, token, repository, "latest") != layer:
                raise AssertionError("pulled another layer than pushed")

        self._run(registry, step)
