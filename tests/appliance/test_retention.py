"""Retention policies and the janitor on a whole appliance: real registry, nginx, token
service, supervisord and skopeo (issue 13's done-when).

The clock is controlled through the history: every tag is pushed for real (the
registry's notification records it in `registry_events`), then the test moves each push
event's `at` back by the tag's age in days, directly in the auth database (`age()`).
The policy reads push times only from that history, so it sees exactly those ages;
the registry's storage and the images are untouched by it.

One appliance for the module; the tests run in order and build on each other.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from appliance import settings as settings_module
from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import OciImage, build_index, build_layered
from tests.support.skopeo import Skopeo

DAY = 86400
BASE = {"base.bin": os.urandom(32 * 1024)}
# The 15 tags of team/app with their age in days (what the history will say).
AGES = {
    "ci-01": 1,
    "ci-02": 2,
    "ci-03": 3,  # ci-01..03: the newest three
    "stable": 5,  # the same manifest as ci-09
    "ci-04": 10,
    "ci-05": 20,  # pushed within 30d
    "ci-06": 40,
    "ci-07": 50,  # pulled today: kept by --pulled-within
    "ci-08": 60,
    "ci-09": 70,
    "ci-10": 80,
    "v1.1": 90,
    "v1.0": 100,  # matched by --keep '^v[0-9]'
    "multi-old": 120,  # a two-platform index: one unit
    "rel-1": 200,  # immutable ('^rel-')
}
EXPECTED = {"ci-06", "ci-08", "ci-09", "ci-10", "multi-old"}
POLICY = ["--keep-last", "3", "--keep", "^v[0-9]", "--older-than", "30d", "--pulled-within", "14d"]


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create(prefix="appliance-retention-")
    try:
        appliance.reconfigure()
        appliance.wait_listening()
        for path in ("team/app", "ops/runaway", "ops/jan"):
            appliance.ctl("project", "create", path)
        appliance.ctl("project", "update", "team/app", "--immutable-tags", "^rel-")
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def client(appliance: ApplianceUnderTest, tmp_path_factory) -> Skopeo:
    return appliance.skopeo(tmp_path_factory.mktemp("client"))


def database(appliance: ApplianceUnderTest) -> Path:
    return settings_module.load(appliance.config_file, must_exist=True).auth_database


def pushes(appliance: ApplianceUnderTest, repository: str) -> dict[str, int]:
    """Tag -> push events recorded so far."""
    with sqlite3.connect(database(appliance)) as db:
        rows = db.execute(
            "SELECT tag, COUNT(*) FROM registry_events WHERE repository = ? AND action = 'push'"
            " AND tag IS NOT NULL GROUP BY tag",
            (repository,),
        ).fetchall()
    return dict(rows)


def age(appliance: ApplianceUnderTest, repository: str, ages: dict[str, float]) -> None:
    """Move each tag's push events `days` back (the controlled clock), once the
    registry's notifications of every push have arrived."""
    wait_for(
        lambda: set(ages) <= set(pushes(appliance, repository)),
        what=f"the push events of {repository}",
    )
    now = time.time()
    with sqlite3.connect(database(appliance)) as db:
        for tag, days in ages.items():
            db.execute(
                "UPDATE registry_events SET at = ? WHERE repository = ? AND tag = ?"
                " AND action = 'push'",
                (now - days * DAY, repository, tag),
            )


def wait_for(condition, timeout: float = 60, what: str = "") -> object:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def tags(appliance: ApplianceUnderTest, repository: str) -> dict[str, dict]:
    rows = json.loads(appliance.ctl("tag", "list", repository, "--json").stdout)
    return {row["tag"]: row for row in rows}


def listed(output: str, repository: str) -> set[str]:
    """The tags a retention run's output lists as deleted (its diff lines)."""
    pattern = re.compile(rf"^    {re.escape(repository)}:([\w.-]+)  ", re.M)
    return set(pattern.findall(output))


def storage(appliance: ApplianceUnderTest) -> Path:
    return appliance.root / "var/opt/appliance/registry/data/docker/registry/v2"


def blob_exists(appliance: ApplianceUnderTest, digest: str) -> bool:
    hex_digest = digest.split(":", 1)[1]
    return (storage(appliance) / f"blobs/sha256/{hex_digest[:2]}/{hex_digest}/data").exists()


def blob_bytes(appliance: ApplianceUnderTest) -> tuple[int, int]:
    files = list((storage(appliance) / "blobs").rglob("data"))
    return len(files), sum(f.stat().st_size for f in files)


@pytest.fixture(scope="module")
def team(appliance, client, tmp_path_factory) -> dict:
    """15 tags of team/app pushed for real, then aged through the history."""
    work = tmp_path_factory.mktemp("images")
    images: dict[str, OciImage] = {}
    for tag in AGES:
        if tag in ("stable", "multi-old"):
            continue
        images[tag] = build_layered(work / tag, tag, [BASE, {f"{tag}.bin": os.urandom(16 * 1024)}])
        client.push(images[tag], "team/app", tag)
    client.push(images["ci-09"], "team/app", "stable")  # a second tag on ci-09's manifest
    index = build_index(
        work / "multi",
        "multi-old",
        {
            "linux/amd64": [BASE, {"amd64.bin": os.urandom(16 * 1024)}],
            "linux/arm64": [{"arm64.bin": os.urandom(16 * 1024)}],
        },
    )
    client.push_all(index, "team/app")
    assert len(tags(appliance, "team/app")) == 15
    age(appliance, "team/app", AGES)
    client.pull("team/app", "ci-07", tmp_path_factory.mktemp("pulled"))  # a pull today
    wait_for(lambda: tags(appliance, "team/app")["ci-07"]["last_pulled"], what="ci-07's pull event")
    return {"images": images, "index": index}


def test_the_policy_is_set_shown_and_checked(appliance):
    out = appliance.ctl("project", "retention", "team/app", *POLICY).stdout
    assert (
        "Retention policy of team/app: keeps the newest 3 per repository, tags matching "
        "'^v[0-9]', tags pushed within 30d, tags pulled within 2w; deletes the other tags"
    ) in out
    assert "appliance-ctl retention run team/app --dry-run" in out
    assert (
        "Retention policy of team/app: keeps the newest 3"
        in appliance.ctl("project", "show", "team/app").stdout
    )
    bad = appliance.ctl("project", "retention", "team/app", "--older-than", "soon", check=False)
    assert bad.returncode == 2
    assert "--older-than 'soon' is not an age" in bad.stderr
    assert (
        "keeps the newest 3" in appliance.ctl("project", "retention", "team/app", "--show").stdout
    )


def test_tag_list_shows_pushed_at_by_and_last_pulled(appliance, team):
    rows = tags(appliance, "team/app")
    assert rows["ci-01"]["pushed_by"] == "root"
    assert abs(rows["ci-10"]["pushed_at"] - (time.time() - 80 * DAY)) < 300
    assert rows["ci-07"]["last_pulled"] and not rows["ci-08"]["last_pulled"]
    table = appliance.ctl("tag", "list", "team/app").stdout
    assert "PUSHED BY" in table and "LAST PULLED" in table


def test_the_dry_run_lists_exactly_what_the_real_run_deletes(appliance, team):
    before = tags(appliance, "team/app")
    preview = appliance.ctl("retention", "run", "team/app", "--dry-run").stdout
    assert listed(preview, "team/app") == EXPECTED, preview
    assert "would delete 5 tags in 1 project with a policy; nothing was changed" in preview
    assert "team/app:ci-10  pushed 80d ago by root, never pulled: not among the newest 3" in (
        preview
    )
    assert tags(appliance, "team/app") == before  # the preview changed nothing

    real = appliance.ctl("retention", "run", "team/app").stdout
    assert listed(real, "team/app") == listed(preview, "team/app")
    left = tags(appliance, "team/app")
    assert set(before) - set(left) == EXPECTED
    # Survivors: the keep regex, the immutable tag, the pulled tag, the newest, and the
    # other tag on ci-09's manifest (whose manifest stays).
    assert {"v1.0", "v1.1", "rel-1", "ci-07", "ci-01", "stable"} <= set(left)
    assert left["stable"]["digest"] == before["ci-09"]["digest"]
    assert "team/app:ci-09 removed; sha256:" in real and "kept: still tagged stable" in real
    assert "index" in real and "deleted with 2 platform manifests" in real
    # A second run finds nothing more to delete; --verbose says what keeps each tag.
    again = appliance.ctl("retention", "run", "team/app", "--dry-run", "--verbose").stdout
    assert listed(again, "team/app") == set()
    kept = {
        "v1.0": "kept: matches --keep '^v[0-9]'",
        "rel-1": "kept: guarded by the tag rule immutable '^rel-'",
        "ci-07": "kept: pulled within 2w",
        "ci-01": "kept: among the newest 3",
        "ci-05": "kept: pushed within 30d",
    }
    for tag, reason in kept.items():
        line = rf"^  team/app:{re.escape(tag)}  pushed .*: {re.escape(reason)}$"
        assert re.search(line, again, re.M), (tag, again)
    log_dir = appliance.root / "var/log/appliance/retention"
    assert any("team/app:ci-10" in log.read_text() for log in log_dir.glob("*.log"))


def test_the_garbage_collection_then_frees_their_bytes(appliance, client, team, tmp_path):
    images, index = team["images"], team["index"]
    gone = [images[t].layer_digests[1] for t in ("ci-06", "ci-08", "ci-10")]
    gone += [child.layer_digests[-1] for child in index.children.values()]
    gone += [child.manifest_digest for child in index.children.values()]
    assert all(blob_exists(appliance, d) for d in gone)
    count, size = blob_bytes(appliance)
    appliance.ctl("registry-garbage-collect")
    assert not any(blob_exists(appliance, d) for d in gone)
    after_count, after_size = blob_bytes(appliance)
    assert after_count <= count - len(gone) and after_size < size - 5 * 16 * 1024
    # What stays still pulls: the shared manifest, the immutable tag, a kept CI tag.
    assert blob_exists(appliance, images["ci-09"].layer_digests[1])
    for tag in ("stable", "rel-1", "v1.0", "ci-05"):
        client.pull("team/app", tag, tmp_path / tag)


def test_max_delete_stops_a_runaway_policy(appliance, client, tmp_path):
    for n in range(4):
        image = build_layered(tmp_path / f"r{n}", f"r{n}", [{f"r{n}": os.urandom(1024)}])
        client.push(image, "ops/runaway", f"r{n}")
    age(appliance, "ops/runaway", {f"r{n}": 10 for n in range(4)})
    appliance.ctl(
        "project", "retention", "ops/runaway", "--keep-last", "0", "--older-than", "1d",
        "--max-delete", "2",
    )  # fmt: skip
    preview = appliance.ctl("retention", "run", "ops/runaway", "--dry-run", check=False)
    assert preview.returncode == 1
    assert listed(preview.stdout, "ops/runaway") == set()  # the real run deletes nothing
    assert "would delete 4 tags, more than --max-delete 2; nothing was deleted" in preview.stdout
    assert "    (not deleted) ops/runaway:r3  pushed 10d ago by root" in preview.stdout
    real = appliance.ctl("retention", "run", "ops/runaway", check=False)
    assert real.returncode == 1
    assert "--max-delete stopped the policy of ops/runaway: nothing was deleted" in real.stderr
    assert set(tags(appliance, "ops/runaway")) == {"r0", "r1", "r2", "r3"}
    appliance.ctl("project", "retention", "ops/runaway", "--off")


def test_the_janitor_runs_on_schedule_logs_its_run_and_frees_bytes(appliance, client, tmp_path):
    for n in range(3):
        image = build_layered(tmp_path / f"j{n}", f"j{n}", [{f"j{n}": os.urandom(64 * 1024)}])
        client.push(image, "ops/jan", f"j{n}")
    client.push(image, "ops/jan", "fresh")
    age(appliance, "ops/jan", {"j0": 5, "j1": 6, "j2": 7})
    appliance.ctl("project", "retention", "ops/jan", "--keep-last", "1", "--older-than", "1d")
    count, size = blob_bytes(appliance)
    appliance.write_config({"janitor": {"enable": True, "schedule": "10s"}})
    appliance.reconfigure()
    state_file = appliance.root / "var/opt/appliance/janitor.json"

    def ran() -> dict | None:
        try:
            last = json.loads(state_file.read_text()).get("last") or {}
        except (OSError, ValueError):
            return None
        return last if last.get("finished") else None

    last = wait_for(ran, timeout=90, what="the janitor's first run")
    assert last["result"] == "ok", last
    assert last["deleted_tags"] == 3  # j2 shares fresh's manifest: only unlinked
    assert last["freed_bytes"] > 64 * 1024
    assert set(tags(appliance, "ops/jan")) == {"fresh"}
    assert blob_bytes(appliance)[1] < size
    log = (appliance.root / "var/log/appliance/janitor/current").read_text()
    assert "janitor: run finished: ok; 3 tags deleted" in log
    assert "retention: deleted 3 tags" in log and "registry-garbage-collect: freed" in log
    status = appliance.ctl("status", check=False).stdout
    assert re.search(r"^run: janitor: \(pid \d+\)", status, re.M), status
    note = r"^  janitor: last run .*: ok, 3 tags deleted, [0-9.]+ KiB freed; next run "
    assert re.search(note, status, re.M), status
