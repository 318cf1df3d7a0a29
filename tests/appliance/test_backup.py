"""Issue 14's backup and restore, done when: images pushed, users, a personal access
token and a deploy token created; a backup taken while a push runs; the root purged;
the archive restored onto a fresh install at the same root; then the token and the
deploy token still sign in, every digest pulls identical, the old bundle still
verifies new tokens (same key), and the next reconfigure changes nothing. A truncated or
tampered archive is refused with a sentence and nothing changed.

One appliance, its state carried from test to test in `state` (the tests run in order:
each is one step of the admin's story).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import build_image

V2 = "registry/docker/registry/v2"
PASSWORD = "alice's password"


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    appliance = ApplianceUnderTest.create(prefix="backup-")
    work = tmp_path_factory.mktemp("backup")
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield {"appliance": appliance, "work": work}
    finally:
        appliance.destroy()


def secret_values(appliance: ApplianceUnderTest) -> list[str]:
    secrets = json.loads((appliance.root / "etc/appliance/appliance-secrets.json").read_text())
    return [v for k, v in secrets.items() if "certificate" not in k and "digest" not in k and v]


def archive_path(output: str) -> Path:
    return Path(re.search(r"^backup: (/\S+\.tar\.gz) \(", output, re.M).group(1))


def test_backup_during_a_push(state):
    appliance, work = state["appliance"], state["work"]
    appliance.ctl("user", "create", "alice", "--password-stdin", input=PASSWORD + "\n")
    appliance.ctl("project", "create", "team/app", "--owner", "alice")
    out = appliance.ctl(
        "token", "create", "alice", "--name", "ci", "--scope", "read_registry"
    ).stdout
    state["pat"] = out.strip().splitlines()[-1].strip()
    out = appliance.ctl(
        "deploy-token", "create", "team/app", "--name", "k8s", "--scope", "read_registry"
    ).stdout
    state["robot"] = (
        re.search(r"^username: (\S+)$", out, re.M).group(1),
        re.search(r"^password: (\S+)$", out, re.M).group(1),
    )
    root = appliance.skopeo(work / "root-client")
    pushed = {}
    for repository, tag in (("team/app", "v1"), ("team/app", "v2"), ("root/tools", "latest")):
        image = build_image(work / f"image-{tag}", tag=tag, random_bytes=200_000)
        root.push(image, repository, tag)
        pushed[(repository, tag)] = image.manifest_digest
    state["pushed"] = pushed

    big = build_image(work / "image-big", tag="big", random_bytes=96 << 20)
    errors: list[BaseException] = []

    def push_big() -> None:
        try:
            appliance.skopeo(work / "big-client").push(big, "team/app", "big")
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    pusher = threading.Thread(target=push_big)
    pusher.start()
    uploads = appliance.root / "var/opt/appliance/registry/data" / V2[9:] / "repositories"
    deadline = time.monotonic() + 30
    while not list(uploads.glob("team/app/_uploads/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    result = appliance.ctl("backup", "--to", str(work / "archives"))
    state["backup_seconds"] = time.monotonic() - started
    pusher.join(300)
    assert pusher.is_alive() is False
    # The push either ended before the window or was refused inside it, as a garbage
    # collection's window refuses pushes (pulls go on): a token asked for inside it gets
    # the maintenance sentence, a request of an upload already under way the read-only
    # registry's bare 405. Never half of it in the archive (checked below).
    refusals = ("maintenance", "denied", "405")
    assert not errors or any(word in str(errors[0]) for word in refusals), errors
    state["big_pushed"] = not errors
    assert not (appliance.root / "var/opt/appliance/registry-maintenance.json").exists()
    after = build_image(work / "image-after-backup", tag="after-backup")
    root.push(after, "root/tools", "after-backup")  # read-write again

    archive = archive_path(result.stdout)
    state["archive"] = archive
    assert archive.parent == work / "archives"
    assert archive.stat().st_mode & 0o777 == 0o600
    assert "registry data:" in result.stdout and "auth database" in result.stdout
    assert re.search(r"inside a read-only window of [\d.]+ s \(pulls went on", result.stdout)
    for value in secret_values(appliance):
        assert value not in result.stdout + result.stderr
    logs = list((appliance.root / "var/log/appliance/backup").glob("*.log"))
    assert len(logs) == 1 and str(archive) in logs[0].read_text()
    print(result.stdout)

    # Self-consistent: every manifest a repository links is in the archive, with every
    # blob it references.
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
        blobs = {n.split("/")[-2] for n in names if n.startswith(f"{V2}/blobs/")}
        revisions = {
            n.split("/")[-2]
            for n in names
            if "/_manifests/revisions/sha256/" in n and n.endswith("/link")
        }
        assert revisions
        for digest in revisions:
            assert digest in blobs
            body = json.load(tar.extractfile(f"{V2}/blobs/sha256/{digest[:2]}/{digest}/data"))
            for blob in [body["config"], *body["layers"]]:
                assert blob["digest"].split(":")[1] in blobs, (digest, blob)
    assert not any("/_uploads/" in n for n in names)
    assert manifest["storage"] == {
        "driver": "filesystem",
        "images": "included",
        "note": manifest["storage"]["note"],
    }
    assert set(manifest["members"]) == set(names) - {"MANIFEST.json"}
    tags = {
        (n.split("/repositories/")[1].split("/_manifests/")[0], n.split("/")[-3])
        for n in names
        if "/_manifests/tags/" in n and n.endswith("/current/link")
    }
    assert set(pushed) <= tags
    state["archived_tags"] = tags
    state["old_bundle"] = (
        appliance.root / "var/opt/appliance/registry/token-bundle.crt"
    ).read_bytes()


def test_skip_images_archive_holds_no_registry_data(state):
    appliance = state["appliance"]
    result = appliance.ctl("backup", "--to", str(state["work"] / "archives"), "--skip-images")
    assert "the images are not in this archive (--skip-images)" in result.stdout
    archive = archive_path(result.stdout)
    assert archive != state["archive"]  # a new name each time, the first one untouched
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert not [n for n in names if n.startswith("registry/")]
    assert manifest["storage"]["images"] == "skipped"
    assert "root/var/opt/appliance/auth/auth.db" in names


def test_s3_backup_holds_everything_but_the_bucket_and_says_so(state):
    """The backup never reads the bucket, so the config alone decides (no reconfigure)."""
    appliance = state["appliance"]
    secret = "s3-secret-never-printed"
    original = dict(appliance.config)
    s3 = {"accesskey": "k", "secretkey": secret, "bucket": "images", "region": "us-east-1"}
    try:
        appliance.write_config({"registry": {"storage": {"s3": s3}}})
        result = appliance.ctl("backup", "--to", str(state["work"] / "s3-archives"))
    finally:
        appliance.config = original
        appliance.write_config()
    assert (
        "the images are not in this archive: they stay in s3 bucket images; protect them "
        "with the bucket's own versioning or replication." in result.stdout
    )
    assert secret not in result.stdout + result.stderr
    with tarfile.open(archive_path(result.stdout)) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
        assert secret.encode() in tar.extractfile("config/appliance.yml").read()
    assert not [n for n in names if n.startswith("registry/")]
    assert manifest["storage"]["driver"] == "s3"
    assert manifest["storage"]["images"] == "not included"


def test_restore_refuses_a_host_with_data(state, tmp_path):
    appliance = state["appliance"]
    config_before = appliance.config_file.read_bytes()
    result = appliance.ctl("restore", str(state["archive"]), check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr  # one sentence
    assert "this host has data a restore would replace" in result.stderr
    assert "1 users besides root, 1 projects, 1 personal access tokens" in result.stderr
    assert "repositories" in result.stderr and "--force" in result.stderr
    assert appliance.config_file.read_bytes() == config_before


def damaged_copies(archive: Path, work: Path) -> dict[str, Path]:
    data = archive.read_bytes()
    truncated = work / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    raw = bytearray(gzip.decompress(data))
    with tarfile.open(archive) as tar:
        secrets = tar.getmember("root/etc/appliance/appliance-secrets.json")
        offset = secrets.offset_data
    flipped = bytearray(raw)
    flipped[offset + 10] ^= 0x20
    tampered = work / "tampered.tar.gz"
    tampered.write_bytes(gzip.compress(bytes(flipped)))
    return {"truncated": truncated, "tampered": tampered}


def test_a_truncated_or_tampered_archive_is_refused_and_nothing_changes(state):
    appliance, work = state["appliance"], state["work"]
    watched = [
        appliance.config_file,
        appliance.root / "etc/appliance/appliance-secrets.json",
        appliance.root / "var/opt/appliance/auth/auth.db",
    ]
    before = [path.read_bytes() for path in watched]
    pids = appliance.wait_until_running()
    for kind, damaged in damaged_copies(state["archive"], work).items():
        result = appliance.ctl("restore", "--force", str(damaged), check=False)
        assert result.returncode == 1, (kind, result.stdout, result.stderr)
        message = result.stderr.strip()
        assert message.count("\n") == 0 and message.endswith("nothing was changed."), message
        expected = "truncated or damaged" if kind == "truncated" else "checksum of root/etc"
        assert expected in message, message
        assert [path.read_bytes() for path in watched] == before
        assert appliance.pids() == pids  # nothing stopped either
        assert not (appliance.root / "var/opt/appliance/.restore-staging").exists()


def test_restore_onto_a_purged_root(state):
    old, work = state["appliance"], state["work"]
    root = old.root
    archive = work / "kept" / state["archive"].name
    archive.parent.mkdir()
    shutil.copy(state["archive"], archive)
    state["kept_archive"] = archive
    old.shutdown()
    for part in ("etc", "var"):
        shutil.rmtree(root / part)
    assert sorted(p.name for p in root.iterdir()) == []

    # A fresh install at the same root: the package's config, one reconfigure.
    fresh = ApplianceUnderTest(root=root, config=dict(old.config), password=old.password)
    fresh.write_config()
    fresh.reconfigure()
    fresh.wait_until_running()
    fresh_secrets = secret_values(fresh)
    started = time.monotonic()
    result = fresh.ctl("restore", str(archive), timeout=300)
    state["restore_seconds"] = time.monotonic() - started
    print(result.stdout)
    assert "restore: checking" in result.stdout and "files checked (SHA-256)" in result.stdout
    assert "restore: stopped every service" in result.stdout
    assert re.search(r"^reconfigure: \d+/\d+ resources updated", result.stdout, re.M)
    for value in fresh_secrets + secret_values(fresh):
        assert value not in result.stdout + result.stderr
    fresh.wait_until_running()
    state["restored"] = fresh

    # The personal access token and the deploy token sign in.
    pat = fresh.skopeo(work / "pat", username="alice", password=state["pat"])
    assert "v1" in pat.list_tags("team/app")
    robot = fresh.skopeo(work / "robot", *state["robot"])
    assert "v2" in robot.list_tags("team/app")
    # Every digest pulls identical, the one pushed during the backup too if it was in.
    root_client = fresh.skopeo(work / "root-after")
    for repository, tag in sorted(state["archived_tags"]):
        pulled = root_client.pull(repository, tag, work / f"pulled-{tag}")
        if (repository, tag) in state["pushed"]:
            assert pulled.manifest_digest == state["pushed"][(repository, tag)]

    # The registry's account owns the restored data: a push into a restored repository.
    after = build_image(work / "image-after", tag="after")
    root_client.push(after, "team/app", "after")
    assert root_client.digest("team/app", "after") == after.manifest_digest

    # A registry configured with the old bundle accepts the restored service's tokens.
    token = fresh.token("repository:team/app:pull")
    certificate = x509.load_pem_x509_certificate(state["old_bundle"])
    claims = jwt.decode(
        token,
        certificate.public_key(),
        algorithms=["ES256", "RS256"],
        audience="container_registry",
    )
    assert claims["access"][0]["name"] == "team/app"
    # The registry checks x5c against its bundle first: the same certificate, byte for byte.
    header = jwt.get_unverified_header(token)
    assert base64.b64decode(header["x5c"][0]) == certificate.public_bytes(
        serialization.Encoding.DER
    )

    again = fresh.reconfigure().stdout
    assert re.search(r"^reconfigure: 0/\d+ resources updated", again, re.M), again
    database = root / "var/opt/appliance/auth/auth.db"
    assert database.stat().st_mode & 0o777 == 0o600  # as the auth service made it
    with tarfile.open(archive) as tar:
        members = json.load(tar.extractfile("MANIFEST.json"))["members"]
    assert members["root/var/opt/appliance/auth/auth.db"]["mode"] == "0600"
    print(
        f"figures: backup {state['backup_seconds']:.1f} s, archive "
        f"{archive.stat().st_size / 2**20:.1f} MiB, restore {state['restore_seconds']:.1f} s"
    )


def test_force_replaces_the_data_it_lists(state):
    """On a host with data, --force replaces what the refusal listed: an image pushed
    after the backup is gone, the archive's images are back."""
    restored, work = state["restored"], state["work"]
    result = restored.ctl("restore", "--force", str(state["kept_archive"]), timeout=300)
    assert re.search(r"^restore: replacing the auth database .*\(--force\)$", result.stdout, re.M)
    assert re.search(
        r"^restore: replacing the registry's data in .*\(--force\)$", result.stdout, re.M
    )
    restored.wait_until_running()
    client = restored.skopeo(work / "after-force")
    tags = client.list_tags("team/app")
    assert "after" not in tags and {"v1", "v2"} <= set(tags)
    assert client.digest("team/app", "v1") == state["pushed"][("team/app", "v1")]
