"""`appliance-ctl cluster export` and `cluster join` on two real appliances sharing one
storage (on loopback: the network-namespace cluster is tests/appliance/test_cluster.py).

- a node whose keys are not the cluster's is refused by reconfigure with a sentence,
  before anything is written;
- a damaged export file is refused by join in one sentence, nothing changed;
- after the join, a token the first node's token service issued is accepted by the
  second node's registry, and `check` says the keys are the cluster's;
- a record naming other keys turns `check` to FAIL and reconfigure to a refusal.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance import cluster
from appliance.registry_storage import FilesystemStorage
from appliance.secrets import load_or_generate
from tests.support.appliance import ApplianceUnderTest

SECRETS = "etc/appliance/appliance-secrets.json"


@pytest.fixture(scope="module")
def shared_storage():
    path = Path(tempfile.mkdtemp(prefix="appliance-shared-"))
    os.chmod(path, 0o755)
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes(shared_storage):
    extra = {"registry": {"storage_path": str(shared_storage / "data")}}
    a = ApplianceUnderTest.create(extra, prefix="appliance-node-a-")
    b = ApplianceUnderTest.create(extra, prefix="appliance-node-b-")
    try:
        yield a, b
    finally:
        a.destroy()
        b.destroy()


def secrets_path(node: ApplianceUnderTest) -> Path:
    return node.root / SECRETS


def registry_accepts(node: ApplianceUnderTest, token: str, repository: str) -> int:
    request = urllib.request.Request(
        f"http://{node.registry_internal_address}/v2/{repository}/tags/list",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_export_then_join_makes_one_cluster(nodes, shared_storage, tmp_path):
    a, b = nodes
    a.reconfigure()
    export = tmp_path / "cluster-secrets.json"
    run = a.ctl("cluster", "export", str(export))
    assert "cluster export: wrote" in run.stdout
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    a_secrets = json.loads(secrets_path(a).read_text())
    assert a_secrets["token_signing_key"] not in run.stdout + run.stderr

    # B was never joined: its freshly generated keys are refused, nothing is written.
    refused = b.reconfigure(check=False)
    assert refused.returncode != 0
    assert "differ from the cluster's" in refused.stderr
    assert "appliance-ctl cluster join FILE" in refused.stderr
    assert not secrets_path(b).exists()

    # A damaged file: one sentence, nothing changed.
    damaged = tmp_path / "damaged.json"
    document = json.loads(export.read_text())
    document["secrets"]["registry_http_secret"] = "0" * 64
    damaged.write_text(json.dumps(document))
    result = b.ctl("cluster", "join", str(damaged), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().endswith(
        "its checksum does not match its content (the file was changed or cut short); "
        "export it again on a node of the cluster and copy it whole."
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not secrets_path(b).exists()

    b.ctl("cluster", "join", str(export))
    b.wait_until_running()
    b_secrets = json.loads(secrets_path(b).read_text())
    for name in ("token_signing_key", "registry_http_secret", "letsencrypt_account_key"):
        assert b_secrets[name] == a_secrets[name]
    assert stat.S_IMODE(secrets_path(b).stat().st_mode) == 0o600

    # A token A's token service issued opens B's registry.
    b.wait_listening()
    token = a.token("repository:root/shared:pull,push")
    assert registry_accepts(b, token, "root/shared") in (200, 404)  # 404: no such repo yet
    assert registry_accepts(b, "not-a-token", "root/shared") == 401

    check = b.ctl("check", check=False).stdout
    assert "ok    cluster: Signing key and http secret are the cluster's" in check


def test_a_node_with_other_keys_is_told_by_check_and_reconfigure(nodes, shared_storage, tmp_path):
    a, b = nodes
    other = load_or_generate(tmp_path / "other-secrets.json")
    cluster.record(FilesystemStorage(shared_storage / "data"), other)
    try:
        check = b.ctl("check", check=False)
        assert check.returncode == 1
        line = next(x for x in check.stdout.splitlines() if "cluster:" in x)
        assert line.startswith(
            "FAIL  cluster: This node's token-signing key and registry http secret differ "
            "from the cluster's"
        )
        assert "Fix: Run appliance-ctl cluster join FILE" in line
        before = secrets_path(b).read_bytes()
        refused = b.reconfigure(check=False)
        assert refused.returncode != 0 and "differ from the cluster's" in refused.stderr
        assert secrets_path(b).read_bytes() == before
    finally:
        a.ctl("cluster", "export", str(tmp_path / "again.json"))
    b.reconfigure()


def test_a_key_rotation_on_a_cluster_waits_for_every_node_and_refuses_no_token(nodes, tmp_path):
    """rotate-token-key on A stops after step 1 (A's registry trusts both keys, A still
    signs with the old one); the rotating state exported and joined on B makes B's
    registry trust both too; --continue on A signs with the new key, whose tokens B's
    registry accepts at once; a second export and join brings B onto the new key."""
    a, b = nodes
    old_key = json.loads(secrets_path(a).read_text())["token_signing_key"]
    step_one = a.ctl("rotate-token-key").stdout
    assert "Step 1 of 2 done: this node's registry trusts the old and the new key" in step_one
    assert json.loads(secrets_path(a).read_text())["token_signing_key"] == old_key
    again = a.ctl("rotate-token-key", check=False)
    assert again.returncode != 0 and "A rotation waits for the other nodes" in again.stderr

    a.ctl("cluster", "export", str(tmp_path / "rotating.json"))
    b.ctl("cluster", "join", str(tmp_path / "rotating.json"))
    bundle = (b.root / "var/opt/appliance/registry/token-bundle.crt").read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 2

    done = a.ctl("rotate-token-key", "--continue").stdout
    assert "The token service signs with the new key" in done
    assert "cluster export FILE here and cluster join FILE on every other node" in done
    new_key = json.loads(secrets_path(a).read_text())["token_signing_key"]
    assert new_key != old_key
    a.wait_listening()
    b.wait_listening()
    token = a.token("repository:root/rotated:pull")
    assert registry_accepts(b, token, "root/rotated") in (200, 404)
    assert registry_accepts(a, b.token("repository:root/rotated:pull"), "root/rotated") in (
        200,
        404,
    )

    a.ctl("cluster", "export", str(tmp_path / "rotated.json"))
    b.ctl("cluster", "join", str(tmp_path / "rotated.json"))
    assert json.loads(secrets_path(b).read_text())["token_signing_key"] == new_key
    assert "ok    cluster:" in b.ctl("check", check=False).stdout
