"""Garbage collection's pure parts: the maintenance window's marker and who it holds
back, the refusal sentence, the plan (what Distribution's collector deletes), the
per-repository figures and the stats file; the token service refusing writes in-process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from appliance import registry_maintenance as maintenance
from appliance.auth import credentials
from appliance.auth.app import TokenService
from appliance.auth.permissions import maintenance_refusal
from appliance.auth.store import Store
from appliance.registry_gc import (
    by_repository,
    expected_seconds,
    human,
    next_stats,
    read_stats,
    unlinked_manifests,
    unreferenced,
    write_stats,
)
from appliance.registry_storage import FilesystemStorage, read_content, untagged
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import make_config
from tests.unit.test_registry_storage import Layout

NOON = time.mktime((2026, 11, 28, 12, 0, 0, 0, 0, 0)) - time.timezone  # 12:00:00 UTC


# ---------------------------------------------------------------- the refusal


@pytest.mark.parametrize(
    ("requested", "reason", "until", "expected"),
    [
        (["pull"], "garbage collection", NOON + 600, ""),
        (["pull", "push"], None, NOON + 600, ""),
        (["pull", "push"], "garbage collection", NOON + 600, "until about 12:10 UTC"),
        (["delete"], "garbage collection", NOON + 601, "until about 12:11 UTC"),  # rounded up
        (["*"], "garbage collection", NOON + 600, "until about 12:10 UTC"),
        # an overrun estimate says a minute from now, not a time gone by
        (["push"], "garbage collection", NOON - 3600, "until about 12:01 UTC"),
    ],
)
def test_writes_are_refused_with_a_time_and_pulls_never(requested, reason, until, expected):
    sentence = maintenance_refusal(requested, reason, until, NOON)
    if not expected:
        assert sentence == ""
    else:
        assert sentence == (
            f"registry is in maintenance (garbage collection) {expected}; retry later"
        )


# ---------------------------------------------------------------- the marker


def window(pid: int, **changes) -> maintenance.Window:
    values = dict(
        reason="garbage collection",
        started=NOON,
        expected_end=NOON + 60,
        pid=pid,
        pid_start=maintenance.process_start(pid),
    )
    values.update(changes)
    return maintenance.Window(**values)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_marker_is_written_whole_readable_by_every_account(tmp_path):
    path = tmp_path / "registry-maintenance.json"
    os.umask(0o077)
    try:
        maintenance.write(path, window(os.getpid()))
    finally:
        os.umask(0o022)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert maintenance.read(path) == window(os.getpid())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: None, maintenance.ABSENT),
        (lambda: window(os.getpid()), maintenance.OPEN),
        (lambda: window(os.getpid(), phase=maintenance.CLOSING), maintenance.CLOSING),
        (lambda: window(dead_pid()), maintenance.STALE),
        # the pid lives, but it is another process than the one that opened the window
        (lambda: window(os.getpid(), pid_start=1), maintenance.STALE),
        # a pid of another account (EPERM) is alive
        (lambda: window(1, pid_start=None), maintenance.OPEN),
    ],
)
def test_a_window_is_in_force_while_its_owner_lives(make, expected):
    assert maintenance.state(make()) == expected


def test_an_unreadable_marker_holds_nothing_back(tmp_path):
    path = tmp_path / "registry-maintenance.json"
    path.write_text("{not json")
    assert maintenance.state_of(path) == maintenance.ABSENT
    watch = maintenance.Watch(path)
    assert watch.state() == maintenance.ABSENT
    maintenance.write(path, window(os.getpid()))
    assert watch.state() == maintenance.OPEN
    maintenance.remove(path)
    assert watch.state() == maintenance.ABSENT


# ---------------------------------------------------------------- the plan


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "storage")


def test_the_plan_is_every_blob_no_revision_references(layout):
    base = b"base" * 100
    v1 = layout.image("team/app", [base, b"v1"], tag="v1")
    v2 = layout.image("team/app", [base, b"v2"], tag="v2")
    amd64 = layout.image("team/multi", [b"amd64"])
    arm64 = layout.image("team/multi", [b"arm64"])
    layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="latest")
    orphan = layout.blob(b"an upload no manifest references")
    content = read_content(FilesystemStorage(layout.root))
    # Untagged revisions are kept by the plain collector; only the orphan goes.
    assert unreferenced(content) == {orphan: len(b"an upload no manifest references")}
    # v2 deleted (its revision gone, as the registry's DELETE leaves it): its manifest
    # and own layer go; the base and the config (the same JSON as v1's here) stay.
    removed = unreferenced(content, {"team/app": [v2]})
    assert set(removed) == {orphan, v2, content.manifests[v2].blobs[2].digest}
    assert v1 not in removed
    # --delete-untagged deletes none of the index's children: nothing of it goes.
    assert untagged(content) == {}
    assert unreferenced(content, untagged(content)) == unreferenced(content)


def test_freed_blobs_are_told_per_repository_a_deleted_manifest_with_its_layers(layout):
    v1 = layout.image("team/app", [b"shared", b"v1"], tag="v1")
    other = layout.image("team/other", [b"shared", b"other"], tag="latest")
    orphan = layout.blob(b"orphan")
    storage = FilesystemStorage(layout.root)
    # The registry deleted team/app:v1: revision and tag links gone, blobs still there.
    (
        layout.root
        / f"docker/registry/v2/repositories/team/app/_manifests/revisions/sha256/{v1[7:]}/link"
    ).unlink()
    content = read_content(storage)
    garbage = unreferenced(content)
    manifests = unlinked_manifests(storage, content, garbage)
    assert set(manifests) == {v1}
    grouped = by_repository(content, garbage, manifests)
    assert set(grouped) == {"team/app", ""}
    assert v1 in grouped["team/app"] and grouped[""] == {orphan: 6}
    assert other not in garbage


def test_stats_add_up_run_after_run(tmp_path):
    path = tmp_path / "registry-gc.json"
    assert read_stats(path)["runs"] == 0
    last = {"started": 1, "finished": 2, "dry_run": False, "freed_bytes": 10, "freed_blobs": 2}
    write_stats(path, next_stats(read_stats(path), last))
    write_stats(path, next_stats(read_stats(path), {**last, "freed_bytes": 5, "freed_blobs": 1}))
    stats = json.loads(path.read_text())
    assert (stats["runs"], stats["freed_bytes_total"], stats["freed_blobs_total"]) == (2, 15, 3)
    assert stats["last"]["freed_blobs"] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_figures_read_as_people_write_them():
    assert [human(n) for n in (0, 1023, 1536, 5 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]
    assert expected_seconds(1000, remote=False, previous_window=None) == 62
    assert expected_seconds(1000, remote=True, previous_window=None) == 80
    assert expected_seconds(10, remote=False, previous_window=100) == 180


# ---------------------------------------------------------------- the token service


@pytest.fixture
def service(tmp_path: Path, monkeypatch) -> TokenService:
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path)
    Store(config.database).create_user("root", credentials.hash_password("a password"), admin=True)
    return TokenService(config)


def test_the_token_service_refuses_writes_during_a_window_and_grants_pulls(service):
    root = ("root", "a password")
    marker = service.config.maintenance_file
    maintenance.write(marker, window(os.getpid(), expected_end=time.time() + 300))
    refused = call(service, query=token_query("repository:root/app:pull,push"), basic=root)
    assert refused.status == 401
    [error] = refused.body["errors"]
    assert error["code"] == "DENIED"
    assert error["message"].startswith(
        "registry is in maintenance (garbage collection) until about "
    )
    pulled = call(service, query=token_query("repository:root/app:pull"), basic=root)
    assert pulled.status == 200
    audit = [json.loads(line) for line in service.config.audit_log.read_text().splitlines()]
    assert audit[0]["result"] == "refused" and audit[0]["reason"] == error["message"]
    # closing: still refused until the marker is gone; a stale one refuses nothing
    maintenance.write(marker, window(os.getpid(), phase=maintenance.CLOSING))
    assert call(service, query=token_query("repository:root/app:*"), basic=root).status == 401
    maintenance.write(marker, window(dead_pid()))
    assert call(service, query=token_query("repository:root/app:push"), basic=root).status == 200
    maintenance.remove(marker)
    assert call(service, query=token_query("repository:root/app:delete"), basic=root).status == 200


# ---------------------------------------------------------------- the run, refused


def test_unreachable_storage_is_one_sentence_before_any_window(tmp_path):
    import io

    import recipes
    from appliance import pipeline
    from appliance.errors import ApplianceError
    from tests.support.recipes import settings_for

    s3 = {"bucket": "b", "region": "r", "regionendpoint": "http://127.0.0.1:1", "secure": False}
    settings = settings_for(tmp_path, registry={"storage": {"s3": s3}})
    out = io.StringIO()
    run = recipes.garbage_collection(settings, dry_run=True)
    with pytest.raises(ApplianceError) as failed:
        pipeline.execute(settings, run, dry_run=True, stream=out)
    message = str(failed.value)
    assert "cannot list docker/registry/v2/blobs/ in s3 bucket b" in message
    assert message.endswith("check registry.storage.s3 (endpoint, credentials, bucket policy).")
    assert "\n" not in message
    assert not settings.paths.registry_maintenance.exists()


def test_a_disabled_registry_has_nothing_to_collect(tmp_path):
    import io

    import recipes
    from appliance import pipeline
    from appliance.errors import ApplianceError
    from tests.support.recipes import settings_for

    settings = settings_for(tmp_path, registry={"enable": False})
    with pytest.raises(ApplianceError, match="registry is disabled"):
        pipeline.execute(
            settings, recipes.garbage_collection(settings), dry_run=True, stream=io.StringIO()
        )


# ---------------------------------------------------------------- the collector, watched


def test_the_collector_is_killed_the_moment_the_registry_is_not_read_only(tmp_path):
    from appliance.registry_gc import CollectionError, run_collector

    asked = []

    def still_safe() -> str | None:
        asked.append(time.monotonic())
        return "a registry process that is not read-only is serving" if len(asked) > 3 else None

    started = time.monotonic()
    with pytest.raises(CollectionError, match="stopped: a registry process that is not read-only"):
        run_collector(
            ["sleep", "30"], {"PATH": "/usr/bin:/bin"}, None, tmp_path / "out", str, still_safe
        )
    assert time.monotonic() - started < 5


def test_a_failing_collector_is_named_with_its_error_line_and_its_output(tmp_path):
    from appliance.registry_gc import CollectionError, run_collector

    script = "echo 'time=1 level=error msg=\"s3aws: AccessDenied secret-value\"'; exit 1"
    with pytest.raises(CollectionError) as failed:
        run_collector(
            ["sh", "-c", script],
            {"PATH": "/usr/bin:/bin"},
            None,
            tmp_path / "gc.out",
            lambda line: line.replace("secret-value", "********"),
            lambda: None,
        )
    message = str(failed.value)
    assert "exited with status 1" in message and "AccessDenied ********" in message
    assert str(tmp_path / "gc.out") in message and "secret-value" not in message
    assert "secret-value" not in (tmp_path / "gc.out").read_text()
    assert stat.S_IMODE((tmp_path / "gc.out").stat().st_mode) == 0o600
