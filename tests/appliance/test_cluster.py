"""Several hosts, proven with network-namespace hosts on one machine (tests/support/cluster.py):
a db host (Redis, the moto S3 server), two appliance nodes A and B sharing the bucket,
the Redis and the secrets (cluster export on A, join on B), and an nginx front.

- an image pushed through A is pulled through B with identical digests, and Redis holds
  the blob descriptors both registries share;
- a token A's token service issued is accepted by B's registry;
- A killed (kill -9 of supervisord and every child) during a pull loop through the
  front: failures stop within a few seconds, the images are all still there.

One cluster serves the module (it starts in about 10 s); the failover test runs last
and brings A back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.cluster import Cluster, Node
from tests.support.counting_client import Registry
from tests.support.oci import build_image
from tests.support.pull_loop import PullLoop
from tests.support.skopeo import Skopeo

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="network namespaces need root (CI runs as root)"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def skopeo(cluster: Cluster, node: Node, home) -> Skopeo:  # noqa: ANN001 - a Path
    """A client of one node, directly (its own address; TLS not verified: the
    certificate names the front's address)."""
    return Skopeo(home=home, registry=node.address, username="root", password=node.password)


def https(address: str, timeout: float = 10) -> http.client.HTTPSConnection:
    host, port = address.rsplit(":", 1)
    return http.client.HTTPSConnection(
        host, int(port), context=ssl._create_unverified_context(), timeout=timeout
    )


def get(address: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = https(address)
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_push_through_a_pull_through_b_identical_digests(cluster, tmp_path):
    a, b = cluster.nodes
    image = build_image(tmp_path / "image", tag="v1", random_bytes=256 * 1024)
    with cluster.front_host.entered():
        skopeo(cluster, a, tmp_path / "client-a").push(image, "root/shared", "v1")
        pulled = skopeo(cluster, b, tmp_path / "client-b").pull(
            "root/shared", "v1", tmp_path / "pulled"
        )
    assert (pulled.manifest_digest, pulled.config_digest, pulled.layer_digests) == (
        image.manifest_digest,
        image.config_digest,
        image.layer_digests,
    )
    # Both registries keep their blob descriptors in the one Redis.
    assert f"blobs::{image.layer_digests[0]}" in cluster.redis.keys("blobs::*")


def test_a_token_issued_by_a_is_accepted_by_bs_registry(cluster, tmp_path):
    a, b = cluster.nodes
    basic = Registry(a).basic()
    scope = "repository:root/shared:pull"
    with cluster.front_host.entered():
        status, body = get(a.address, f"/jwt/auth?service=container_registry&scope={scope}", basic)
        assert status == 200
        token = json.loads(body)["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        status, body = get(b.address, "/v2/root/shared/tags/list", bearer)
        assert (status, json.loads(body)["tags"]) == (200, ["v1"])
        status, _ = get(b.address, "/v2/root/shared/tags/list", {"Authorization": "Bearer x"})
        assert status == 401


@dataclass
class TimedPulls:
    """Pulls through the front in a loop from the front host, each success and failure
    with its time (time.monotonic)."""

    cluster: Cluster
    images: list[tuple[str, str]]
    threads: int = 2
    done: list[tuple[float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> TimedPulls:
        for number in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(number,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> TimedPulls:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        return self

    def _loop(self, number: int) -> None:
        self.cluster.front_host.enter_for_good()  # this worker thread only
        registry = Registry(self.cluster.front)
        conn = registry.client()
        turn = number
        while not self._stop.is_set():
            repository, tag = self.images[turn % len(self.images)]
            turn += 1
            try:
                PullLoop.pull(registry, conn, repository, tag)
                self.done.append((time.monotonic(), True, ""))
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as exc:
                self.done.append((time.monotonic(), False, repr(exc)[:200]))
                conn.reset()
                time.sleep(0.05)

    def failures(self) -> list[tuple[float, bool, str]]:
        return [d for d in self.done if not d[1]]


def test_a_killed_node_costs_pulls_through_the_front_a_few_seconds_at_most(cluster, tmp_path):
    a, b = cluster.nodes
    images = []
    with cluster.front_host.entered():
        registry = Registry(cluster.front)
        conn = registry.client()
        for number in range(3):
            repository = f"root/failover-{number}"
            token = registry.token(conn, repository)
            layer = hashlib.sha256(str(number).encode()).digest() * 2048
            registry.push_image(conn, token, repository, "v1", layer)
            images.append((repository, "v1"))
        conn.close()
    loop = TimedPulls(cluster, images).start()
    try:
        time.sleep(3)
        before = len(loop.done)
        assert before > 0 and not loop.failures(), loop.failures()[:3]
        killed_at = time.monotonic()
        killed = a.kill_everything()
        assert len(killed) >= 4  # supervisord, nginx, the registry, the token service ...
        time.sleep(8)
    finally:
        loop.stop()
    after = [d for d in loop.done if d[0] > killed_at]
    failures = [d for d in after if not d[1]]
    last_failure = max((d[0] for d in failures), default=killed_at) - killed_at
    assert last_failure < 3, failures[:5]
    recovered = [d for d in after if d[1] and d[0] > killed_at + last_failure]
    assert len(recovered) > 10
    # No data lost: every image still pulls whole through B alone.
    with cluster.front_host.entered():
        registry = Registry(cluster.front)
        conn = registry.client()
        for repository, tag in images:
            PullLoop.pull(registry, conn, repository, tag)
        conn.close()
    # A comes back with a reconfigure, as after a reboot.
    a.reconfigure()
    a.wait_until_running()
