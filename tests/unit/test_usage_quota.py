"""Usage and quotas without processes: sizes as an admin types them, the quota rows of
the permission decision, the registry's events as the service reads them, the figures
grouped into projects, the metrics text, and the service's internal listener."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from appliance import usage as usage_module
from appliance.auth import events, metrics
from appliance.auth.app import REFUSAL_STATUS, TokenService
from appliance.auth.names import owning_project
from appliance.auth.permissions import USER, Principal, ProjectAccess, decide
from appliance.auth.sizes import SizeError, format_size, parse_size
from appliance.auth.store import HISTORY_KEPT, RegistryEvent, Store
from appliance.auth.usage import current, project_bytes
from appliance.registry_storage import FilesystemStorage, read_content
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import EVENTS_SECRET, make_config
from tests.unit.test_registry_storage import Layout

GIB = 1024**3

# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GiB", 20 * GIB),
        ("20 GiB", 20 * GIB),
        ("20gib", 20 * GIB),
        ("1.5TiB", int(1.5 * 1024**4)),
        ("500MiB", 500 * 1024**2),
        ("64KiB", 64 * 1024),
        ("20GB", 20 * 10**9),
        ("500MB", 500 * 10**6),
        ("1KB", 1000),
        ("2TB", 2 * 10**12),
        ("1024", 1024),
        ("1024B", 1024),
    ],
)
def test_sizes_are_read_in_binary_and_decimal_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "20 parsecs", "-5GiB", "20 Gib b", "1e3MB", "0GiB"])
def test_a_bad_size_is_one_sentence_naming_it(text):
    with pytest.raises(SizeError) as refused:
        parse_size(text)
    assert repr(text) in str(refused.value)
    assert str(refused.value).count(".") >= 1 and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (20 * GIB, "20 GiB"),
        (int(21.3 * GIB), "21.3 GiB"),
        (int(1.5 * 1024**4), "1.5 TiB"),
    ],
)
def test_sizes_are_printed_in_binary_units_with_one_decimal(size, text):
    assert format_size(size) == text
    assert size == 0 or abs(parse_size(text.replace(" ", "")) - size) <= 0.05 * max(size, 1)


# ---------------------------------------------------------------- the decision


def _project(quota: int | None, used: int, role: str = "developer") -> ProjectAccess:
    return ProjectAccess(
        path="team/app",
        visibility="private",
        registry_enabled=True,
        role=role,
        project_id=7,
        quota_bytes=quota,
        used_bytes=used,
    )


CAROL = Principal(kind=USER, name="carol", user_id=3)
SENTENCE = (
    "team/app uses 21.3 GiB of its 20 GiB quota; delete images (then run a garbage "
    "collection) or ask an administrator to raise the quota"
)

# role, quota, used, requested -> granted, refused with the sentence
QUOTA_ROWS = [
    ("developer", None, 30 * GIB, "pull,push", "pull,push", False),  # no quota
    ("developer", 20 * GIB, 19 * GIB, "pull,push", "pull,push", False),  # under it
    ("developer", 20 * GIB, 20 * GIB, "pull,push", "pull,push", False),  # at it exactly
    ("developer", 20 * GIB, int(21.3 * GIB), "push", "-", True),
    ("developer", 20 * GIB, int(21.3 * GIB), "pull,push", "-", True),  # came to push
    ("developer", 20 * GIB, int(21.3 * GIB), "pull", "pull", False),  # pulls go on
    ("maintainer", 20 * GIB, int(21.3 * GIB), "delete", "delete", False),  # deletes too
    ("maintainer", 20 * GIB, int(21.3 * GIB), "*", "pull,delete", False),  # skopeo delete
    ("maintainer", 20 * GIB, int(21.3 * GIB), "pull,push,delete", "-", True),
    ("reporter", 20 * GIB, int(21.3 * GIB), "pull,push", "pull", False),  # may not push anyway
]


@pytest.mark.parametrize(("role", "quota", "used", "requested", "granted", "refused"), QUOTA_ROWS)
def test_quota_rows(role, quota, used, requested, granted, refused):
    decision = decide(CAROL, _project(quota, used, role), requested.split(","))
    assert decision.granted == (() if granted == "-" else tuple(granted.split(",")))
    assert decision.refusal == (SENTENCE if refused else "")
    if refused:
        assert decision.reason == SENTENCE


def test_an_admin_over_quota_is_refused_too():
    admin = Principal(kind=USER, name="root", user_id=1, admin=True)
    assert decide(admin, _project(20 * GIB, int(21.3 * GIB), None), ["push"]).refusal == SENTENCE


# ---------------------------------------------------------------- the registry's events


def envelope(*items: dict) -> bytes:
    return json.dumps({"events": list(items)}).encode()


def event(action: str, media_type: str, **target: object) -> dict:
    return {
        "id": f"id-{action}-{target.get('digest')}",
        "timestamp": "2026-11-28T12:00:00.123456789Z",
        "action": action,
        "target": {"mediaType": media_type, "repository": "team/app/web", **target},
        "request": {"addr": "10.0.0.5", "method": "PUT", "useragent": "skopeo/1.9.3"},
        "actor": {"name": "alice"},
    }


MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_manifest_events_make_the_history_and_pushed_blobs_the_usage():
    parsed = events.parse(
        envelope(
            event("push", "application/octet-stream", digest="sha256:aa", size=100),
            event("mount", "application/octet-stream", digest="sha256:bb", size=200),
            event("push", MANIFEST, digest="sha256:cc", size=30, tag="v1"),
            event("pull", MANIFEST, digest="sha256:cc", size=30, tag="v1"),
            event("pull", "application/octet-stream", digest="sha256:aa", size=100),
            {
                "id": "d",
                "action": "delete",
                "target": {"repository": "team/app/web", "digest": "sha256:cc"},
            },
        )
    )
    assert [(e.action, e.digest, e.tag) for e in parsed.manifests] == [
        ("push", "sha256:cc", "v1"),
        ("pull", "sha256:cc", "v1"),
        ("delete", "sha256:cc", None),
    ]
    push = parsed.manifests[0]
    assert (push.actor, push.address, push.user_agent) == ("alice", "10.0.0.5", "skopeo/1.9.3")
    assert push.at == pytest.approx(1795867200.123456)
    assert [(r, d, s) for r, d, s, _ in parsed.pushed_blobs] == [
        ("team/app/web", "sha256:aa", 100),
        ("team/app/web", "sha256:bb", 200),
        ("team/app/web", "sha256:cc", 30),  # the manifest is a blob in storage too
    ]


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"events": 3}'])
def test_what_is_no_envelope_is_refused(body):
    with pytest.raises(events.BadEnvelope):
        events.parse(body)


def test_events_naming_no_valid_repository_are_skipped():
    bad = event("push", MANIFEST, digest="sha256:cc", size=1)
    bad["target"]["repository"] = "../../etc"
    assert events.parse(envelope(bad, "junk")).manifests == []


def test_history_keeps_the_last_events_per_repository_and_kind(tmp_path, auth_database):
    config = make_config(tmp_path, database=auth_database)
    store = Store(config.database)

    def record(action: str, number: int, repository: str = "team/app") -> RegistryEvent:
        return RegistryEvent(
            f"{action}-{number}",
            action,
            repository,
            "v1",
            "sha256:x",
            None,
            1,
            "a",
            None,
            None,
            float(number),
        )

    store.record_events([record("push", 0)])
    store.record_events([record("pull", n) for n in range(HISTORY_KEPT + 5)])
    store.record_events([record("pull", HISTORY_KEPT + 4)])  # again: recorded once
    assert store.event_counts() == {"push": 1, "pull": HISTORY_KEPT}
    assert store.history("team/app", "pull", 1)[0].event_id == f"pull-{HISTORY_KEPT + 4}"
    assert store.history("team", "push")[0].event_id == "push-0"  # a project's path
    assert store.history("tea") == []  # component-wise


# ---------------------------------------------------------------- figures


def test_repositories_count_against_their_longest_project_else_their_namespace():
    projects = {"team/app", "team/app/sub"}
    assert owning_project("team/app/web", projects) == "team/app"
    assert owning_project("team/app/sub/x", projects) == "team/app/sub"
    assert owning_project("team/application", projects) == "team"
    assert owning_project("alice/tool", projects) == "alice"


def test_figures_group_repositories_into_projects_with_shared_bytes(tmp_path):
    layout = Layout(tmp_path / "storage")
    base = b"shared-base" * 1000
    layout.image("team/app/web", [base, b"web"], tag="v1")
    layout.image("team/app/api", [base, b"api"], tag="v1")
    layout.image("other/tool", [base, b"tool"], tag="v1")
    garbage = layout.blob(b"left behind")
    content = read_content(FilesystemStorage(layout.root))
    figures = usage_module.compute(content, ["team/app", "other/tool"], 100.0, "fs")
    team, other = figures["projects"]["team/app"], figures["projects"]["other/tool"]
    assert team["repositories"] == 2 and other["repositories"] == 1
    # The base counts once per project, once in the total, and is shared by both.
    assert team["shared_bytes"] == other["shared_bytes"] == len(base)
    assert team["bytes"] + other["bytes"] == figures["referenced_bytes"] + len(base)
    assert figures["reclaimable_bytes"] == len(layout.read(garbage))
    assert figures["total_bytes"] == figures["referenced_bytes"] + figures["reclaimable_bytes"]
    # Within a project, a repository shares the base with its sibling.
    assert figures["repositories"]["team/app/web"]["shared_bytes"] == len(base)
    lines = usage_module.report(figures, "project", {"team/app": 20 * GIB})
    assert lines[0].split() == ["PROJECT", "SIZE", "SHARED", "REPOSITORIES", "QUOTA"]
    assert lines[2].split()[-2:] == ["20", "GiB"]


def test_pushes_since_the_computation_are_added_to_the_project_and_the_total():
    figures = {"computed_at": 5.0, "total_bytes": 1000, "projects": {"team/app": {"bytes": 600}}}
    assert project_bytes(figures, {"team/app": 50}, "team/app") == 650
    assert project_bytes(None, {"new/one": 10}, "new/one") == 10
    now = current(figures, {"team/app": 50, "new/one": 10})
    assert now["total_bytes"] == 1060
    assert now["projects"]["new/one"]["bytes"] == 10


def test_metrics_text_escapes_labels_and_reads_the_gc_figures():
    text = metrics.render(
        {"total_bytes": 7, "projects": {'we"ird': {"bytes": 5, "shared_bytes": 1}}},
        {'we"ird': 9},
        {"runs": 2, "freed_bytes_total": 300, "freed_blobs_total": 4, "last": {"dry_run": True}},
        {"push": 3},
    ).decode()
    assert 'appliance_storage_bytes{project="we\\"ird"} 5' in text
    assert 'appliance_storage_quota_bytes{project="we\\"ird"} 9' in text
    assert "appliance_storage_bytes_total 7" in text
    assert "appliance_gc_runs_total 2" in text
    assert "appliance_gc_freed_bytes_total 300" in text
    assert "appliance_gc_last_dry_run 1" in text
    assert 'appliance_registry_events_recorded{action="push"} 3' in text
    assert "# TYPE appliance_gc_runs_total counter" in text


# ---------------------------------------------------------------- the service


@pytest.fixture
def service(tmp_path: Path, monkeypatch, auth_database) -> TokenService:
    """The service on each engine (SQLite, PostgreSQL) in turn."""
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path, database=auth_database)
    service = TokenService(config)
    from appliance.auth import credentials

    service.store.create_user("carol", credentials.hash_password("carol password"))
    service.store.create_project("team/app", "private", True)
    service.store.add_member("team/app", "carol", "developer")
    return service


def post_events(service: TokenService, body: bytes, secret: str = EVENTS_SECRET, internal=True):
    captured = {}
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/-/registry-events",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "HTTP_AUTHORIZATION": f"Bearer {secret}",
        "appliance.internal": internal,
    }

    def start_response(status: str, headers: list) -> None:
        captured["status"] = int(status.split()[0])

    b"".join(service(environ, start_response))
    return captured["status"]


def test_events_need_the_secret_and_the_internal_listener(service):
    body = envelope(event("push", MANIFEST, digest="sha256:cc", size=30, tag="v1"))
    assert post_events(service, body, secret="guess") == 401
    assert post_events(service, body, secret="") == 401
    assert post_events(service, body, internal=False) == 404  # nginx's listener
    assert service.store.history() == []
    assert post_events(service, body) == 204
    assert post_events(service, body) == 204  # redelivered: recorded once
    assert [e.digest for e in service.store.history()] == ["sha256:cc"]
    assert post_events(service, b"{}") == 400


def test_a_push_over_quota_is_refused_with_the_sentence_and_pulls_are_granted(service):
    service.store.set_quota("team/app", 1000)
    body = envelope(
        event("push", "application/octet-stream", digest="sha256:aa", size=1500),
    )
    assert post_events(service, body) == 204  # 1500 bytes pushed since: over 1000
    basic = ("carol", "carol password")
    refused = call(service, query=token_query("repository:team/app/web:pull,push"), basic=basic)
    assert refused.status == REFUSAL_STATUS
    assert refused.body["errors"] == [
        {
            "code": "DENIED",
            "message": "team/app uses 1.5 KiB of its 1000 B quota; delete images (then run "
            "a garbage collection) or ask an administrator to raise the quota",
        }
    ]
    pulled = call(service, query=token_query("repository:team/app/web:pull"), basic=basic)
    assert pulled.status == 200
    service.store.set_quota("team/app", 2000)
    assert (
        call(service, query=token_query("repository:team/app/web:pull,push"), basic=basic).status
        == 200
    )


def test_metrics_are_served_on_the_internal_listener_only(service):
    def get(internal: bool) -> tuple[int, bytes]:
        captured = {}
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "appliance.internal": internal}

        def start_response(status: str, headers: list) -> None:
            captured["status"] = int(status.split()[0])

        body = b"".join(service(environ, start_response))
        return captured["status"], body

    status, body = get(True)
    assert status == 200 and b"appliance_storage_bytes_total 0" in body
    assert get(False)[0] == 404
