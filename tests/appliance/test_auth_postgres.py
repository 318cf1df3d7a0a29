"""Two whole appliances (nodes A and B, their own roots and ports) on one PostgreSQL
auth database (tests/support/postgres.py: a real server on loopback): what an admin
does on one node is what every node answers at its next request.

The tests run in order on one pair of nodes: both reconfigured at once on an empty
database first (one migration, no error), then users, projects and tokens made with
appliance-ctl on A and used through B with skopeo, then blocks and revocations, then
a garbage collection's window opened on A seen by B's token service.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from appliance.auth import store as auth_store
from appliance.auth.migrations import MIGRATIONS
from tests.support.appliance import BIN, ApplianceUnderTest
from tests.support.oci import build_layered
from tests.support.postgres import PostgresServer
from tests.support.skopeo import SkopeoError

SENTENCE = "registry is in maintenance (garbage collection) until about "
ALICE = "alice's password 1"


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer):
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def nodes(database):
    settings = {
        "auth": {
            "database_url": database.url,
            "database_password_file": str(database.password_file),
        }
    }
    node_a = ApplianceUnderTest.create(settings, prefix="appliance-pg-a-")
    node_b = ApplianceUnderTest.create(
        {**settings, "initial_root_password": node_a.password}, prefix="appliance-pg-b-"
    )
    try:
        yield node_a, node_b
    finally:
        node_a.destroy()
        node_b.destroy()


def token_status(node: ApplianceUnderTest, username: str, password: str, scope: str) -> int:
    """What the node's token service answers a docker-style token request."""
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"https://{node.registry_address}/jwt/auth?service=container_registry&scope={scope}",
        headers={"Authorization": f"Basic {basic}"},
    )
    context = ssl.create_default_context(cafile=str(node.certificate))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def put_manifest(node: ApplianceUnderTest, repository: str, tag: str, token: str) -> tuple:
    """A manifest PUT through the node's nginx with a bearer token: status and body."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "0" * 64,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    request = urllib.request.Request(
        f"https://{node.registry_address}/v2/{repository}/manifests/{tag}",
        data=manifest,
        method="PUT",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
        },
    )
    context = ssl.create_default_context(cafile=str(node.certificate))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_both_nodes_reconfigured_at_once_migrate_once_without_error(nodes, database, tmp_path):
    """An empty database, two first reconfigures at the same moment: both succeed (no
    "relation already exists", no duplicate admin), the schema is at the latest
    version, and the password never reaches their output."""
    node_a, node_b = nodes
    assert auth_store.schema_version(database) is None
    # Both runs wait at their schema step until both are there, then migrate together.
    hold = tmp_path / "hold"
    hold.touch()

    def reconfigure(node: ApplianceUnderTest) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "appliance-ctl"), "-c", str(node.config_file), "reconfigure"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "APPLIANCE_TEST_HOLD_AT": f"auth-schema:{hold}"},
        )

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(reconfigure, node) for node in nodes]
        wait_for(lambda: len(list(tmp_path.glob("hold.arrived.*"))) == 2, 120, "both runs")
        hold.unlink()
        runs = [run.result() for run in running]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "a-test-only-password" not in run.stdout + run.stderr
    assert auth_store.schema_version(database) == len(MIGRATIONS)
    assert [u.username for u in auth_store.Store(database).list_users()] == ["root"]
    # The service reads its own copy of the password, readable by its account alone.
    copy = node_a.root / "var/opt/appliance/auth/database-password"
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    # Both serve root, whichever node created it.
    for node in nodes:
        assert token_status(node, "root", node_a.password, "repository:root/x:pull") == 200
    # A reconfigure again has nothing to migrate.
    again = node_b.reconfigure()
    assert "migrate" not in again.stdout


@pytest.fixture(scope="module")
def alice(nodes, tmp_path_factory) -> dict:
    """Alice, her project and a personal access token, all made on node A."""
    node_a, _ = nodes
    node_a.ctl("user", "create", "alice", "--password-stdin", input=ALICE + "\n")
    node_a.ctl("project", "create", "team/app", "--owner", "alice")
    made = node_a.ctl(
        "token", "create", "alice", "--name", "ci", "--scope", "read_registry",
        "--scope", "write_registry",
    )  # fmt: skip
    token_id = int(made.stdout.split("personal access token ")[1].split()[0])
    return {"pat": made.stdout.strip().splitlines()[-1], "pat_id": token_id}


def test_what_node_a_made_is_served_by_node_b_with_skopeo(nodes, alice, tmp_path):
    node_a, node_b = nodes
    image = build_layered(tmp_path / "app", "v1", [{"app": os.urandom(2048)}])
    with_password = node_b.skopeo(tmp_path / "b-alice", "alice", ALICE)
    with_password.push(image, "team/app", "v1")
    pulled = with_password.pull("team/app", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest
    with_token = node_b.skopeo(tmp_path / "b-pat", "alice", alice["pat"])
    with_token.push(image, "team/app", "v2")
    assert with_token.pull("team/app", "v2", tmp_path / "v2").manifest_digest == (
        image.manifest_digest
    )
    # and node A serves the same users from the same database
    node_a.skopeo(tmp_path / "a-alice", "alice", ALICE).push(image, "team/app", "v1")
    # The registries' events land in the one database: A's history shows B's pushes.

    def pushed_tags() -> set[str]:
        lines = node_a.ctl("history", "team/app", "--action", "push", "--json").stdout
        return {json.loads(line)["tag"] for line in lines.splitlines()}

    wait_for(lambda: pushed_tags() >= {"v1", "v2"}, 30, "the pushes in A's history")


def test_a_token_revoked_on_a_is_refused_by_b_at_its_next_request(nodes, alice):
    node_a, node_b = nodes
    scope = "repository:team/app:pull"
    assert token_status(node_b, "alice", alice["pat"], scope) == 200
    node_a.ctl("token", "revoke", "alice", str(alice["pat_id"]))
    assert token_status(node_b, "alice", alice["pat"], scope) == 401


def test_a_user_blocked_on_a_is_refused_by_b_at_its_next_request(nodes, alice):
    """B has just verified alice's password (its credential cache holds it); the block
    made on A bumps her row's credentials_version, which B reads at every request."""
    node_a, node_b = nodes
    scope = "repository:team/app:pull"
    assert token_status(node_b, "alice", ALICE, scope) == 200
    assert token_status(node_b, "alice", ALICE, scope) == 200  # a cache hit now
    node_a.ctl("user", "block", "alice")
    assert token_status(node_b, "alice", ALICE, scope) == 401
    node_a.ctl("user", "unblock", "alice")
    assert token_status(node_b, "alice", ALICE, scope) == 200


def wait_for(condition, timeout: float = 60, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_garbage_collection_window_opened_on_a_refuses_pushes_on_b(nodes, database, tmp_path):
    node_a, node_b = nodes
    root_a = node_a.skopeo(tmp_path / "a-root")
    root_b = node_b.skopeo(tmp_path / "b-root")
    # Something for A's collection to free, so that it opens its window.
    doomed = build_layered(tmp_path / "doomed", "v1", [{"doomed": os.urandom(4096)}])
    root_a.push(doomed, "root/doomed", "v1")
    root_a.delete("root/doomed", "v1")
    late = build_layered(tmp_path / "late", "v1", [{"late": os.urandom(1024)}])
    # A push token B issued before the window: it still says push during A's window.
    early_token = node_b.token("repository:root/late:push,pull")
    hold = tmp_path / "hold"
    hold.touch()
    store = auth_store.Store(database)
    run = subprocess.Popen(
        [str(BIN / "appliance-ctl"), "-c", str(node_a.config_file), "gc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "APPLIANCE_TEST_HOLD_AT": f"gc-window:{hold}"},
    )
    try:
        wait_for(lambda: store.shared_maintenance_window() is not None, what="A's window")
        with pytest.raises(SkopeoError) as refused:
            root_b.push(late, "root/late", "v1")
        assert SENTENCE in refused.value.stderr and "UTC; retry later" in refused.value.stderr
        # B's own registry is read-write, but a manifest written with that earlier token
        # is refused in front of it, so nothing lands while A's collector runs.
        status, body = put_manifest(node_b, "root/late", "v1", early_token)
        assert status == 403 and SENTENCE in body, (status, body)
        # A second maintenance run, on the other node, is refused while A's runs.
        second = node_b.ctl("gc", check=False)
        assert second.returncode != 0
        assert "another maintenance run holds the cluster (a garbage collection on" in (
            second.stderr + second.stdout
        )
    finally:
        hold.unlink(missing_ok=True)
        stdout, stderr = run.communicate(timeout=240)
    assert run.returncode == 0, stdout + stderr
    assert "freed" in stdout
    assert store.shared_maintenance_window() is None
    root_b.push(late, "root/late", "v1")  # the window is closed on every node
