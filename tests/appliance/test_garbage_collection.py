"""`appliance-ctl registry-garbage-collect` on a whole appliance: real registry, nginx,
token service and skopeo, a pull loop counting failures through nginx TLS.

One appliance for the module; the tests run in order and build on what the previous
ones pushed and deleted (the done-when of issue 12's garbage collection part).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.registry_storage import storage_lock
from tests.support.appliance import BIN, ApplianceUnderTest
from tests.support.oci import build_index, build_layered
from tests.support.pull_loop import PullLoop
from tests.support.s3 import s3_client
from tests.support.skopeo import Skopeo, SkopeoError

BASE = {"etc/os-release": b"ID=gc-test-base\n" + b"x" * 4096}
SENTENCE = "registry is in maintenance (garbage collection) until about "


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create(prefix="appliance-gc-")
    try:
        appliance.reconfigure()
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def client(appliance: ApplianceUnderTest, tmp_path_factory) -> Skopeo:
    return appliance.skopeo(tmp_path_factory.mktemp("gc-client"))


@pytest.fixture(scope="module")
def pushed(appliance, client, tmp_path_factory) -> dict:
    """Several tags, images sharing a base layer, a two-platform index; v2 deleted."""
    work = tmp_path_factory.mktemp("gc-images")
    images = {
        "v1": build_layered(work / "app", "v1", [BASE, {"app": b"one"}]),
        "v2": build_layered(work / "app", "v2", [BASE, {"app": os.urandom(8000)}]),
        "other": build_layered(work / "other", "latest", [BASE, {"other": b"other"}]),
    }
    client.push(images["v1"], "root/app", "v1")
    client.push(images["v1"], "root/app", "stable")  # a second tag on the same manifest
    client.push(images["v2"], "root/app", "v2")
    client.push(images["other"], "root/other", "latest")
    index = build_index(
        work / "multi",
        "latest",
        {"linux/amd64": [BASE, {"amd64": b"amd64"}], "linux/arm64": [{"arm64": b"arm64"}]},
    )
    copy_all(client, index.reference, client.url("root/multi", "latest"))
    client.delete("root/app", "v2")  # its manifest goes; its blobs wait for a collection
    return {**images, "index": index}


def copy_all(client: Skopeo, source: str, destination: str) -> None:
    tls = client._tls("dest-") if destination.startswith("docker:") else client._tls("src-")
    creds = client._creds("dest-") if destination.startswith("docker:") else client._creds("src-")
    client.run("copy", "--all", "--quiet", *tls, *creds, source, destination)


def storage(appliance: ApplianceUnderTest) -> Path:
    return appliance.root / "var/opt/appliance/registry/data"


def blob_file(appliance: ApplianceUnderTest, digest: str) -> Path:
    hex_digest = digest.split(":", 1)[1]
    return (
        storage(appliance) / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    )


def tree_hash(root: Path) -> str:
    """Every path, mode and content under `root`: byte-identical or not."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            digest.update(f"{path.relative_to(root)} {path.stat().st_mode:o}\n".encode())
            digest.update(path.read_bytes())
        digest.update(f"{Path(directory).relative_to(root)}/\n".encode())
    return digest.hexdigest()


def gc(appliance: ApplianceUnderTest, *args: str, env: dict | None = None, check: bool = True):
    result = subprocess.run(
        [
            str(BIN / "appliance-ctl"),
            "-c",
            str(appliance.config_file),
            "registry-garbage-collect",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"gc {args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def registry_api(appliance: ApplianceUnderTest):  # noqa: ANN201
    """The registry on its own address, with tokens the appliance signs itself."""
    import recipes
    from appliance import secrets as secrets_module
    from appliance import settings as settings_module

    settings = settings_module.load(appliance.config_file, must_exist=True)
    return recipes.registry_api(settings, secrets_module.for_settings(settings))


def marker(appliance: ApplianceUnderTest) -> Path:
    return appliance.root / "var/opt/appliance/registry-maintenance.json"


def handover_state(appliance: ApplianceUnderTest) -> dict:
    return json.loads(
        (appliance.root / "var/opt/appliance/registry-socket/handover.json").read_text()
    )


def wait_for(condition, timeout: float = 60, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_dry_run_says_what_would_be_freed_and_changes_nothing(appliance, client, pushed):
    before = tree_hash(storage(appliance))
    result = gc(appliance, "--dry-run", "--verbose")
    assert tree_hash(storage(appliance)) == before
    assert "would free 3 blobs" in result.stdout, result.stdout
    assert "root/app: 3 blobs" in result.stdout
    assert not marker(appliance).exists()
    assert not (appliance.root / "var/opt/appliance/registry-gc.json").exists()


def test_gc_frees_the_deleted_images_unique_blobs_while_pulls_go_on_and_pushes_wait(
    appliance, client, pushed, tmp_path
):
    v1, v2, other, index = pushed["v1"], pushed["v2"], pushed["other"], pushed["index"]
    unique_to_v2 = {v2.manifest_digest, v2.config_digest, v2.layer_digests[1]}
    kept = {
        v1.manifest_digest,
        v1.config_digest,
        *v1.layer_digests,
        other.manifest_digest,
        *other.layer_digests,
        index.index_digest,
        *(d for image in index.children.values() for d in image.layer_digests),
        v2.layer_digests[0],  # the shared base
    }
    assert all(blob_file(appliance, d).exists() for d in unique_to_v2 | kept)
    hold = tmp_path / "hold"
    hold.touch()
    loop = PullLoop(
        appliance, [("root/app", "v1"), ("root/other", "latest"), ("root/multi", "latest")]
    ).start()
    try:
        time.sleep(1)
        run = subprocess.Popen(
            [str(BIN / "appliance-ctl"), "-c", str(appliance.config_file), "gc", "--verbose"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "APPLIANCE_TEST_HOLD_AT": f"gc-window:{hold}"},
        )
        wait_for(
            lambda: marker(appliance).exists() and handover_state(appliance).get("readonly"),
            what="the read-only window",
        )
        late = build_layered(tmp_path / "late", "late", [{"late": b"late"}])
        with pytest.raises(SkopeoError) as refused:
            client.push(late, "root/app", "late")
        assert SENTENCE in refused.value.stderr and "UTC; retry later" in refused.value.stderr
        # The registry itself is read-only: a write that got past the token service
        # (a token issued before the window) gets the registry's own refusal.
        upload = registry_api(appliance).request(
            "POST",
            "/v2/root/app/blobs/uploads/",
            [{"type": "repository", "name": "root/app", "actions": ["pull", "push"]}],
        )
        assert upload.status == 405
        # Pulls go on inside the window (the loop keeps counting meanwhile).
        pulls_in_window = loop.pulls
        wait_for(lambda: loop.pulls >= pulls_in_window + 4, what="pulls inside the window")
        assert marker(appliance).exists()  # still inside it: held until the hold file goes
        hold.unlink()
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stdout + stderr
        time.sleep(1)
    finally:
        hold.unlink(missing_ok=True)
        loop.stop()
    assert loop.failures == [] and loop.pulls > 10, loop.failures[:5]
    assert "freed 3 blobs" in stdout, stdout
    assert "root/app: 3 blobs" in stdout
    assert [d for d in unique_to_v2 if blob_file(appliance, d).exists()] == []
    assert [d for d in kept if not blob_file(appliance, d).exists()] == []
    # The window is closed: read-write again, the marker gone, a push accepted.
    assert not marker(appliance).exists() and handover_state(appliance)["readonly"] is False
    client.push(late, "root/app", "late")
    # What the run left: its log, the stats file the token service's /metrics reads.
    logs = list((appliance.root / "var/log/appliance/gc").glob("*.log"))
    assert logs and "freed 3 blobs" in logs[-1].read_text()
    stats_file = appliance.root / "var/opt/appliance/registry-gc.json"
    assert stat.S_IMODE(stats_file.stat().st_mode) == 0o644
    stats = json.loads(stats_file.read_text())
    assert (stats["runs"], stats["freed_blobs_total"]) == (1, 3)
    assert stats["last"]["freed_blobs"] == 3 and stats["last"]["dry_run"] is False
    assert stats["freed_bytes_total"] == stats["last"]["freed_bytes"] > 5000
    assert stats["last"]["finished"] >= stats["last"]["started"]
    # ... and the token service exports it.
    url = f"http://{appliance.config['auth']['internal_addr']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        samples = dict(
            line.rsplit(" ", 1) for line in reply.read().decode().splitlines() if line[:1] != "#"
        )
    assert float(samples["appliance_gc_freed_blobs_total"]) == 3


def test_delete_untagged_keeps_the_index_and_its_platforms_pullable(
    appliance, client, pushed, tmp_path
):
    first = build_layered(tmp_path / "retag", "edge", [BASE, {"edge": b"first"}])
    second = build_layered(tmp_path / "retag2", "edge", [BASE, {"edge": b"second"}])
    client.push(first, "root/app", "edge")
    client.push(second, "root/app", "edge")  # `first` is now untagged
    result = gc(appliance, "--delete-untagged")
    assert "untagged manifests in" in result.stdout and "delete 1 in root/app" in result.stdout
    assert not blob_file(appliance, first.manifest_digest).exists()
    assert not blob_file(appliance, first.layer_digests[1]).exists()
    assert blob_file(appliance, second.manifest_digest).exists()
    index = pushed["index"]
    copy_all(client, client.url("root/multi", "latest"), f"oci:{tmp_path / 'pulled'}:latest")
    for image in index.children.values():  # each platform manifest still answers
        raw = client.run(
            "inspect",
            "--raw",
            *client._tls(""),
            *client._creds(""),
            f"{client.url('root/multi')}@{image.manifest_digest}",
        ).stdout
        assert json.loads(raw)["layers"]
        assert blob_file(appliance, image.manifest_digest).exists()


def test_a_second_run_is_refused_while_the_storage_is_locked(appliance):
    lock = appliance.root / "var/opt/appliance/registry-storage.lock"
    with storage_lock(lock, "a tag deletion"):
        result = gc(appliance, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "appliance-ctl: the registry's storage is busy (a tag deletion, pid"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_killed_inside_its_window_leaves_no_read_only_registry_after_reconfigure(
    appliance, client, pushed, tmp_path
):
    client.delete("root/other", "latest")  # something to collect: the window opens
    result = gc(appliance, env={"APPLIANCE_TEST_CRASH_AT": "gc-window"}, check=False)
    assert result.returncode == -9
    assert marker(appliance).exists()  # stale: its owner is gone
    # The wrapper sees the owner gone and hands itself back on its own ...
    wait_for(lambda: handover_state(appliance)["readonly"] is False, what="read-write again")
    # ... and reconfigure removes the marker (handing the registry over once more).
    run = appliance.reconfigure()
    assert "maintenance window" in run.stdout and "left by pid" in run.stdout, run.stdout
    assert not marker(appliance).exists()
    assert handover_state(appliance)["readonly"] is False
    image = build_layered(tmp_path / "after", "after", [{"after": b"kill"}])
    client.push(image, "root/app", "after")
    assert client.inspect("root/app", "after")["layers"]


def test_s3_storage_is_collected_in_the_bucket(appliance, client, s3_server, tmp_path):
    bucket = s3_client(s3_server)
    bucket.create_bucket(Bucket="registry")
    appliance.write_config(
        {
            "registry": {
                "storage": {
                    "s3": {
                        "accesskey": "testing",
                        "secretkey": "moto-accepts-any-secret-key",
                        "bucket": "registry",
                        "region": "us-east-1",
                        "regionendpoint": s3_server,
                        "secure": False,
                        "v4auth": True,
                        "rootdirectory": "/images",
                    },
                    "redirect": {"disable": True},
                }
            }
        }
    )
    appliance.reconfigure()
    keep = build_layered(tmp_path / "keep", "keep", [BASE, {"keep": b"keep"}])
    gone = build_layered(tmp_path / "gone", "gone", [BASE, {"gone": os.urandom(6000)}])
    client.push(keep, "root/on-s3", "keep")
    client.push(gone, "root/on-s3", "gone")
    client.delete("root/on-s3", "gone")

    def keys() -> set[str]:
        listing = bucket.list_objects_v2(
            Bucket="registry", Prefix="images/docker/registry/v2/blobs/"
        )
        return {item["Key"].split("/")[-2] for item in listing.get("Contents", [])}

    unique = {gone.manifest_digest, gone.config_digest, gone.layer_digests[1]}
    assert {d.split(":")[1] for d in unique} <= keys()
    result = gc(appliance, "--verbose")
    assert "freed 3 blobs" in result.stdout and "root/on-s3: 3 blobs" in result.stdout
    assert not {d.split(":")[1] for d in unique} & keys()
    assert {d.split(":")[1] for d in (keep.manifest_digest, *keep.layer_digests)} <= keys()
    assert (
        client.pull("root/on-s3", "keep", tmp_path / "pulled").layer_digests == keep.layer_digests
    )
