"""Issue 14's storage migration, done when: an appliance on filesystem storage with
images pushed is migrated to s3 (a real moto server) while pulls go on in a loop, with
0 failed pulls; afterwards every digest pulls identical from the new storage, the bucket
holds the blobs, appliance.yml's registry.storage is s3, a reconfigure changes nothing
and the old directory is still there. Also refused: a non-empty target (without
--force), a bad FILE.yml; a dry run leaves the bucket empty.

One appliance for the module; the migration itself is the last test (it switches).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import subprocess
import threading
import time

import pytest
import yaml

from tests.support.appliance import BIN, ApplianceUnderTest
from tests.support.oci import build_index, build_layered
from tests.support.pull_loop import PullLoop
from tests.support.s3 import s3_client
from tests.support.skopeo import SkopeoError

V2 = "docker/registry/v2"
BUCKET = "images"


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    appliance = ApplianceUnderTest.create(prefix="migrate-")
    work = tmp_path_factory.mktemp("migrate")
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        root = appliance.skopeo(work / "client")
        base = {"base/os-release": b"ID=test\n" * 100}
        pushed = {}
        for n, (repository, tag) in enumerate((("team/app", "v1"), ("root/tools", "latest"))):
            image = build_layered(
                work / f"image-{n}", tag, [base, {f"app/{n}": os.urandom(300_000)}]
            )
            root.push(image, repository, tag)
            pushed[(repository, tag)] = image
        index = build_index(work / "index", "multi")
        root.push_all(index, "team/app", "multi")
        yield {"appliance": appliance, "work": work, "root": root, "pushed": pushed, "index": index}
    finally:
        appliance.destroy()


def target_file(state, endpoint: str, name: str = "target.yml") -> str:
    path = state["work"] / name
    section = {
        "s3": {
            "accesskey": "testing",
            "secretkey": "moto-secret-never-printed",
            "bucket": BUCKET,
            "region": "us-east-1",
            "regionendpoint": endpoint,
            "secure": False,
            "v4auth": True,
            "rootdirectory": "/registry",
        },
        "redirect": {"disable": True},
    }
    path.write_text(yaml.safe_dump(section))
    return str(path)


def bucket_keys(endpoint: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def old_root(appliance: ApplianceUnderTest):
    return appliance.root / "var/opt/appliance/registry/data"


def test_a_bad_file_is_refused_with_a_sentence(state):
    appliance, work = state["appliance"], state["work"]
    before = appliance.config_file.read_bytes()
    bad = work / "bad.yml"
    bad.write_text("s3:\n  region: us-east-1\n")
    result = appliance.ctl("storage", "migrate", "--to", str(bad), check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"appliance-ctl: {bad}: registry.storage.s3.bucket: required by the s3 driver; "
        f"correct it and run this again (nothing was changed)."
    )
    bad.write_text("s3: [unclosed\n")
    result = appliance.ctl("storage", "migrate", "--to", str(bad), check=False)
    assert result.returncode != 0 and f"{bad}: not valid YAML at line" in result.stderr
    result = appliance.ctl("storage", "migrate", "--to", str(work / "missing.yml"), check=False)
    assert result.returncode != 0 and "missing.yml: no such file" in result.stderr
    assert appliance.config_file.read_bytes() == before


def test_an_unreachable_target_is_one_sentence_and_nothing_switched(state):
    appliance = state["appliance"]
    before = appliance.config_file.read_bytes()
    result = appliance.ctl(
        "storage", "migrate", "--to", target_file(state, "http://127.0.0.1:9"), check=False
    )
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("appliance-ctl: cannot reach the bucket in s3 bucket images")
    assert "moto-secret-never-printed" not in result.stdout + result.stderr
    assert appliance.config_file.read_bytes() == before


def test_a_dry_run_prints_the_plan_and_leaves_the_bucket_empty(state, s3_server):
    appliance = state["appliance"]
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    before = appliance.config_file.read_bytes()
    result = appliance.ctl("storage", "migrate", "--to", target_file(state, s3_server), "--dry-run")
    line = result.stdout.strip().splitlines()[-1]
    blobs = sum(1 for _ in (old_root(appliance) / V2 / "blobs").rglob("data"))
    assert re.match(
        rf"storage-migrate \(dry run\) to s3 bucket images under /registry: would copy "
        rf"{blobs} blobs \([\d.]+ (KiB|MiB)\) and \d+ repository files; nothing was changed$",
        line,
    ), result.stdout
    assert bucket_keys(s3_server) == []
    assert appliance.config_file.read_bytes() == before
    assert "moto-secret-never-printed" not in result.stdout + result.stderr


def test_a_target_that_is_not_empty_is_refused_saying_what_is_there(state, s3_server):
    appliance = state["appliance"]
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(
        Bucket=BUCKET,
        Key=f"registry/{V2}/repositories/other/app/_manifests/tags/v1/current/link",
        Body=b"sha256:" + b"0" * 64,
    )
    before = appliance.config_file.read_bytes()
    result = appliance.ctl("storage", "migrate", "--to", target_file(state, s3_server), check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "appliance-ctl: s3 bucket images under /registry is not empty (1 files, 71 B, "
        "repositories other/app); migrate to an empty place, or add --force to make it a "
        "copy of the current storage (files the current storage does not have are "
        "removed); nothing was changed."
    )
    assert appliance.config_file.read_bytes() == before
    assert len(bucket_keys(s3_server)) == 1


def test_killed_inside_the_window_nothing_is_switched_and_a_reconfigure_serves_read_write(
    state, s3_server
):
    appliance, work, root = state["appliance"], state["work"], state["root"]
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    before = appliance.config_file.read_bytes()
    result = subprocess.run(
        [
            str(BIN / "appliance-ctl"),
            "-c",
            str(appliance.config_file),
            "storage",
            "migrate",
            "--to",
            target_file(state, s3_server),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "APPLIANCE_TEST_CRASH_AT": "migrate-window"},
    )
    assert result.returncode == -9
    assert appliance.config_file.read_bytes() == before
    appliance.reconfigure()
    assert not (appliance.root / "var/opt/appliance/registry-maintenance.json").exists()
    image = build_layered(work / "after-kill", "after-kill", [{"k": os.urandom(1000)}])
    root.push(image, "team/app", "after-kill")  # read-write, on the old storage
    layer = image.layer_digests[0].split(":")[1]
    assert (old_root(appliance) / V2 / "blobs/sha256" / layer[:2] / layer / "data").exists()
    # Run again with --force: the blobs the killed run copied are verified, not sent again.
    result = appliance.ctl(
        "storage", "migrate", "--to", target_file(state, s3_server), "--dry-run", "--force"
    )
    assert re.search(r"would copy 3 blobs .*; \d+ blobs already there", result.stdout), (
        result.stdout
    )


def test_migration_to_s3_under_a_pull_loop(state, s3_server):
    appliance, work, root = state["appliance"], state["work"], state["root"]
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    config_before = appliance.config_file.read_text()
    images = [*state["pushed"], ("team/app", "multi")]
    # Held after the bulk copy (the registry still read-write): a push there must reach
    # the new storage through the window's sync. Then held inside the window: a push is
    # refused with the maintenance sentence while the pull loop goes on.
    after_copy, in_window = work / "hold-after-copy", work / "hold-in-window"
    after_copy.touch()
    in_window.touch()
    env = {
        **os.environ,
        "APPLIANCE_TEST_HOLD_AT": f"migrate-copied:{after_copy},migrate-window:{in_window}",
    }
    marker = appliance.root / "var/opt/appliance/registry-maintenance.json"
    loop = PullLoop(appliance, images).start()
    late = build_layered(work / "late", "late", [{"late": os.urandom(200_000)}])
    refused = build_layered(work / "refused", "refused", [{"refused": os.urandom(1000)}])
    try:
        process = subprocess.Popen(
            [
                str(BIN / "appliance-ctl"),
                "-c",
                str(appliance.config_file),
                "storage",
                "migrate",
                "--to",
                target_file(state, s3_server),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        outputs: list[str] = []
        reader = threading.Thread(target=lambda: outputs.extend(process.communicate(timeout=600)))
        reader.start()
        deadline = time.monotonic() + 120
        while not any(k.endswith("/data") for k in bucket_keys(s3_server)):
            assert time.monotonic() < deadline and process.poll() is None, "no copy"
            time.sleep(0.2)
        time.sleep(1)  # at the hold by now (the copy is small)
        assert not marker.exists()
        # The storage lock: no garbage collection meanwhile (a backup would wait for the
        # run's reconfigure lock, then copy what appliance.yml names by then).
        busy = appliance.ctl("gc", check=False)
        assert busy.returncode != 0
        assert "the registry's storage is busy (a storage migration, pid " in busy.stderr
        root.push(late, "team/app", "late")
        after_copy.unlink()
        while not marker.exists():
            assert time.monotonic() < deadline and process.poll() is None, "no window"
            time.sleep(0.1)
        time.sleep(1)  # handed over to read-only, at the hold
        with pytest.raises(SkopeoError) as caught:
            root.push(refused, "team/app", "refused")
        assert "registry is in maintenance (storage migration) until about " in str(caught.value)
        in_window.unlink()
        reader.join(600)
    finally:
        loop.stop()
    stdout, stderr = outputs
    print(stdout)
    assert process.returncode == 0, stdout + stderr
    assert loop.pulls > 0 and loop.failures == [], loop.failures
    assert "moto-secret-never-printed" not in stdout + stderr
    summary = next(line for line in stdout.splitlines() if line.startswith("storage-migrate: "))
    assert re.search(r"read-only window [\d.]+ s \(pulls went on", summary), summary
    assert "the old data stays in filesystem" in stdout
    assert f"rm -rf {old_root(appliance) / 'docker'}" in stdout

    # appliance.yml names the new storage; the rest of the admin's file is as it was.
    config = yaml.safe_load(appliance.config_file.read_text())
    assert config["registry"]["storage"] == yaml.safe_load(
        open(target_file(state, s3_server)).read()
    )
    before = yaml.safe_load(config_before)
    before["registry"]["storage"] = config["registry"]["storage"]
    assert config == before

    # Every digest pulls identical, from the new storage.
    keys = bucket_keys(s3_server)
    held = {k.split("/")[-2] for k in keys if "/blobs/sha256/" in k and k.endswith("/data")}
    for (repository, tag), image in [*state["pushed"].items(), (("team/app", "late"), late)]:
        pulled = root.pull(repository, tag, work / f"pulled-{tag}")
        assert pulled.manifest_digest == image.manifest_digest
        for digest in (image.manifest_digest, image.config_digest, *image.layer_digests):
            assert digest.split(":")[1] in held, digest
    assert root.digest("team/app", "multi") == state["index"].index_digest
    root.pull_all("team/app", "multi", work / "pulled-multi")
    for key in keys:
        if "/blobs/sha256/" in key and key.endswith("/data"):
            body = s3_client(s3_server).get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == key.split("/")[-2]

    # The registry writes to the bucket now; the old directory is still there, untouched.
    old_blobs = set((old_root(appliance) / V2 / "blobs").rglob("data"))
    assert old_blobs
    after = build_layered(work / "after", "after", [{"after": os.urandom(100_000)}])
    root.push(after, "team/app", "after")
    assert any(after.layer_digests[0].split(":")[1] in k for k in bucket_keys(s3_server))
    assert set((old_root(appliance) / V2 / "blobs").rglob("data")) == old_blobs

    result = appliance.reconfigure()
    assert re.search(r"^reconfigure: 0/\d+ resources updated", result.stdout, re.M), result.stdout


def test_and_back_to_a_new_filesystem_directory_the_registry_can_write(state, s3_server):
    """The bucket of the test before is gone with its moto server: this one starts from
    a fresh bucket again (the appliance is reconfigured onto it), then migrates to a
    directory the registry's account must own, file by file."""
    appliance, work, root = state["appliance"], state["work"], state["root"]
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    section = yaml.safe_load(open(target_file(state, s3_server)).read())
    appliance.config["registry"]["storage"] = section
    appliance.write_config()
    appliance.reconfigure()
    appliance.wait_listening()
    image = build_layered(work / "round-trip", "v1", [{"round": os.urandom(150_000)}])
    root.push(image, "team/back", "v1")
    directory = appliance.root / "srv/images"
    target = work / "back.yml"
    target.write_text(yaml.safe_dump({"filesystem": {"rootdirectory": str(directory)}}))
    result = appliance.ctl("storage", "migrate", "--to", str(target))
    assert "rm -rf" not in result.stdout
    assert "aws s3 rm --recursive s3://images/registry/docker/" in result.stdout
    assert root.pull("team/back", "v1", work / "back-pulled").manifest_digest == (
        image.manifest_digest
    )
    account = pwd.getpwnam("appliance-registry")
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in (directory / V2).rglob("*")}
    assert owners == {(account.pw_uid, account.pw_gid)}
    again = build_layered(work / "again", "v2", [{"again": os.urandom(1000)}])
    root.push(again, "team/back", "v2")  # the registry's account writes there
    assert (directory / V2 / "repositories/team/back/_manifests/tags/v2").is_dir()
    assert yaml.safe_load(appliance.config_file.read_text())["registry"]["storage"] == {
        "filesystem": {"rootdirectory": str(directory)}
    }
