"""Pulls in a loop through nginx TLS, counting every failure: what a user pulling during
a maintenance window (a garbage collection) would see.

Each pull is a client's: a pull-only token (Basic, as root), the manifest (an index's
children too), then every blob, each digest checked. A failure is anything a client
would report: a non-200, a wrong digest, a refused or cut connection (after the retry
real clients make: tests/support/counting_client.Connection).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from dataclasses import dataclass, field

from tests.support.appliance import ApplianceUnderTest
from tests.support.counting_client import Connection, Registry

ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


@dataclass
class PullLoop:
    appliance: ApplianceUnderTest
    images: list[tuple[str, str]]  # (repository, tag)
    threads: int = 2
    pulls: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> PullLoop:
        registry = Registry(self.appliance)
        for number in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(registry, number), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> PullLoop:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        return self

    def _loop(self, registry: Registry, number: int) -> None:
        conn = registry.client()
        turn = number
        while not self._stop.is_set():
            repository, tag = self.images[turn % len(self.images)]
            turn += 1
            try:
                self.pull(registry, conn, repository, tag)
                error = None
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as exc:
                error = exc
                conn.reset()
            with self._lock:
                self.pulls += 1
                if error is not None:
                    self.failures.append(
                        f"{time.strftime('%H:%M:%S')} {repository}:{tag} {error!r}"
                    )
        conn.close()

    @staticmethod
    def pull(registry: Registry, conn: Connection, repository: str, tag: str) -> None:
        scope = f"repository:{repository}:pull"
        reply = conn.request(
            "GET", f"/jwt/auth?service=container_registry&scope={scope}", headers=registry.basic()
        )
        body = reply.read()
        if reply.status != 200:
            raise AssertionError(f"token: {reply.status} {body[:200]!r}")
        auth = {"Authorization": f"Bearer {json.loads(body)['token']}"}
        references = [tag]
        while references:
            reference = references.pop()
            reply = conn.request(
                "GET",
                f"/v2/{repository}/manifests/{reference}",
                headers={**auth, "Accept": ACCEPT},
            )
            body = reply.read()
            if reply.status != 200:
                raise AssertionError(f"GET manifest {reference}: {reply.status} {body[:200]!r}")
            manifest = json.loads(body)
            references += [child["digest"] for child in manifest.get("manifests", [])]
            for blob in [manifest["config"], *manifest["layers"]] if "config" in manifest else []:
                reply = conn.request(
                    "GET", f"/v2/{repository}/blobs/{blob['digest']}", headers=auth
                )
                data = reply.read()
                if (
                    reply.status != 200
                    or "sha256:" + hashlib.sha256(data).hexdigest() != blob["digest"]
                ):
                    raise AssertionError(f"GET blob {blob['digest']}: {reply.status}")
