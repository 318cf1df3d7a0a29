"""Several hosts, proven with network-namespace hosts on one machine (tests/support/cluster.py):
a db host (PostgreSQL, Redis, the moto S3 server), two appliance nodes A and B sharing
the auth database, the bucket, the Redis and the secrets (cluster export on A, join on
B), and an nginx front.

- both nodes reconfigured at once onto an empty database: one migration, no error;
- an image pushed through A is pulled through B with identical digests, and Redis holds
  the blob descriptors both registries share;
- a token A's token service issued is accepted by B's registry;
- a PAT revoked and a user blocked on A are refused by B at its next request;
- a garbage collection on A while pulls go on through the front: 0 failed pulls, and
  B refuses pushes with the maintenance sentence;
- A killed (kill -9 of supervisord and every child) during a pull loop through the
  front: failures stop within a few seconds, the images are all still there.

One cluster serves the module (it starts in about 10 s); the tests run in order, the
failover last (it brings A back).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from appliance.auth import store as auth_store
from appliance.auth.database import PostgresDatabase
from appliance.auth.migrations import MIGRATIONS
from tests.support.appliance import BIN
from tests.support.cluster import Cluster, Node, TimedPulls, push_images
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


SENTENCE = "registry is in maintenance (garbage collection) until about "
ALICE = "alice's password 1"


def wait_for(condition, timeout: float = 60, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def token_reply(node: Node, username: str, password: str, scope: str) -> tuple[int, str]:
    """What the node's own token service answers (its address, from the front host)."""
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    path = f"/jwt/auth?service=container_registry&scope={scope}"
    status, body = get(node.address, path, {"Authorization": f"Basic {basic}"})
    return status, body.decode(errors="replace")


def test_both_nodes_reconfigured_at_once_onto_an_empty_database_migrate_once(cluster, tmp_path):
    """Both nodes moved to a new, empty database and reconfigured at the same moment
    (each held at its schema step until both are there): both succeed, the schema is
    migrated once to the latest version, one root user."""
    cluster.postgres.sql('CREATE DATABASE "fresh"')
    url = cluster.postgres.url("fresh")
    hold = tmp_path / "hold"
    hold.touch()
    runs = []
    for node in cluster.nodes:
        node.write_config({"auth": {"database_url": url}})
        runs.append(
            subprocess.Popen(
                [*node.host.prefix, str(BIN / "appliance-ctl"), "-c", str(node.config_file),
                 "reconfigure"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "APPLIANCE_TEST_HOLD_AT": f"auth-schema:{hold}"},
            )
        )  # fmt: skip
    try:
        wait_for(lambda: len(list(tmp_path.glob("hold.arrived.*"))) == 2, 120, "both runs")
    finally:
        hold.unlink()
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output
        assert "Error" not in output and "a-test-only-password" not in output
    with cluster.db.entered():
        database = PostgresDatabase(url, cluster.postgres.password_file)
        assert auth_store.schema_version(database) == len(MIGRATIONS)
        assert [u.username for u in auth_store.Store(database).list_users()] == ["root"]
    with cluster.front_host.entered():
        for node in cluster.nodes:
            assert token_reply(node, "root", node.password, "repository:root/x:pull")[0] == 200


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


@pytest.fixture(scope="module")
def alice(cluster) -> dict:
    """Alice, her project and a personal access token, all made on node A."""
    a = cluster.nodes[0]
    a.ctl("user", "create", "alice", "--password-stdin", input=ALICE + "\n")
    a.ctl("project", "create", "team/app", "--owner", "alice")
    made = a.ctl("token", "create", "alice", "--name", "ci", "--scope", "read_registry")
    token_id = int(made.stdout.split("personal access token ")[1].split()[0])
    return {"pat": made.stdout.strip().splitlines()[-1], "pat_id": token_id}


def test_a_pat_revoked_on_a_is_refused_by_b_at_its_next_request(cluster, alice):
    a, b = cluster.nodes
    scope = "repository:team/app:pull"
    with cluster.front_host.entered():
        assert token_reply(b, "alice", alice["pat"], scope)[0] == 200
        a.ctl("token", "revoke", "alice", str(alice["pat_id"]))
        assert token_reply(b, "alice", alice["pat"], scope)[0] == 401


def test_a_user_blocked_on_a_is_refused_by_b_at_its_next_request(cluster, alice):
    """B has just verified alice's password (its credential cache holds it)."""
    a, b = cluster.nodes
    scope = "repository:team/app:pull"
    with cluster.front_host.entered():
        assert token_reply(b, "alice", ALICE, scope)[0] == 200
        assert token_reply(b, "alice", ALICE, scope)[0] == 200  # a cache hit now
        a.ctl("user", "block", "alice")
        assert token_reply(b, "alice", ALICE, scope)[0] == 401
        a.ctl("user", "unblock", "alice")
        assert token_reply(b, "alice", ALICE, scope)[0] == 200


def test_a_garbage_collection_on_a_costs_no_pull_and_b_refuses_pushes(cluster, tmp_path):
    a, b = cluster.nodes
    images = push_images(cluster, "kept", 2)
    doomed = push_images(cluster, "doomed", 1)
    with cluster.front_host.entered():
        root = Skopeo(home=tmp_path / "c", registry=a.address, username="root", password=a.password)
        root.delete(doomed[0][0], "v1")  # something for the collection to free
    hold = tmp_path / "hold"
    hold.touch()
    loop = TimedPulls(cluster, images).start()
    run = subprocess.Popen(
        [*a.host.prefix, str(BIN / "appliance-ctl"), "-c", str(a.config_file), "gc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "APPLIANCE_TEST_HOLD_AT": f"gc-window:{hold}"},
    )
    try:
        wait_for(lambda: list(tmp_path.glob("hold.arrived.*")), 120, "A's window")
        with cluster.front_host.entered():
            status, body = token_reply(b, "root", b.password, "repository:root/late:pull,push")
        assert status != 200 and SENTENCE in body and "UTC; retry later" in body, body
        time.sleep(2)  # pulls through both nodes while the window is open
    finally:
        hold.unlink()
        output = run.communicate(timeout=300)[0]
        loop.stop()
    assert run.returncode == 0, output
    assert len(loop.done) > 10 and loop.failures() == [], loop.failures()[:5]
    with cluster.front_host.entered():
        assert token_reply(b, "root", b.password, "repository:root/late:pull,push")[0] == 200
    # The cluster's record in the bucket is no blob: the collection left it alone.
    assert "ok    cluster: Signing key and http secret are the cluster's" in (
        b.ctl("check", check=False).stdout
    )


def test_a_killed_node_costs_pulls_through_the_front_a_few_seconds_at_most(cluster, tmp_path):
    a, b = cluster.nodes
    images = push_images(cluster, "failover", 3)
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


def test_a_guesser_spread_over_both_nodes_meets_one_limit(cluster, alice):
    """auth.max_failed_logins (10) wrong passwords, alternating between A and B (five
    each, under the limit of either node alone): the counters are the database's, so
    the last is already refused with 429, and both nodes then refuse even the right
    password. Last in the module: the front host's address is limited too."""
    a, b = cluster.nodes
    scope = "repository:team/app:pull"
    with cluster.front_host.entered():
        statuses = [token_reply((a, b)[n % 2], "alice", "wrong", scope)[0] for n in range(10)]
        # Five per node: each node alone is far under its limit; together they meet it.
        assert statuses[:8] == [401] * 8 and statuses[-1] == 429, statuses
        assert token_reply(a, "alice", ALICE, scope)[0] == 429
        assert token_reply(b, "alice", ALICE, scope)[0] == 429
