"""The registry's content as the auth service sees it, through the registry's API: the
same snapshot as storage gives, tags kept current by the recorded events, and the one
delete the API cannot do refused whole. The registry's API is a dict here; a real
registry: tests/appliance/test_api.py."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from appliance.errors import UsageError
from appliance.registry_api import Response
from appliance.registry_content import RegistryContentOverAPI


def manifest(layer: bytes) -> tuple[str, bytes]:
    config = b'{"architecture": "amd64", "os": "linux"}'
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": digest_of(config), "size": len(config)},
            "layers": [{"digest": digest_of(layer), "size": len(layer)}],
        }
    ).encode()
    return digest_of(body), body


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """The requests RegistryContentOverAPI makes, answered from dicts, counted."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, str]] = {}
        self.manifests: dict[str, bytes] = {}
        self.heads = 0
        self.deleted: list[str] = []

    def push(self, repository: str, tag: str, layer: bytes) -> str:
        digest, body = manifest(layer)
        self.manifests[digest] = body
        self.repos.setdefault(repository, {})[tag] = digest
        return digest

    def catalog(self) -> list[str]:
        return sorted(self.repos)

    def manifest(self, repository: str, reference: str) -> Response | None:
        body = self.manifests.get(reference)
        return None if body is None else Response(200, {}, body)

    def blob(self, repository: str, digest: str) -> bytes | None:
        return b'{"architecture": "amd64", "os": "linux"}'

    def tags(self, repository: str) -> list[str]:
        return sorted(self.repos.get(repository, {}))

    def digest(self, repository: str, tag: str) -> str | None:
        self.heads += 1
        return self.repos.get(repository, {}).get(tag)

    def delete_manifest(self, repository: str, digest: str) -> bool:
        self.deleted.append(digest)
        self.repos[repository] = {t: d for t, d in self.repos[repository].items() if d != digest}
        return True


class Events:
    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str, str | None, str | None]] = []

    def add(self, repository: str, action: str, tag: str | None, digest: str) -> None:
        self.rows.append((len(self.rows) + 1, repository, action, tag, digest))

    def changes(self, repository: str, after: int) -> list:
        return [(i, a, t, d) for i, r, a, t, d in self.rows if r == repository and i > after]

    def last(self) -> int:
        return len(self.rows)


@pytest.fixture
def setup():
    registry, events, now = Registry(), Events(), [1000.0]
    content = RegistryContentOverAPI(registry, events.changes, events.last, lambda: now[0])
    return registry, events, content, now


def test_tags_are_listed_once_then_kept_current_by_the_events(setup) -> None:
    registry, events, content, now = setup
    v1 = registry.push("team/app", "v1", b"one")
    registry.push("team/app", "latest", b"one")
    rows = content.tags("team/app")
    assert [(r.tag, r.digest, r.platforms) for r in rows] == [
        ("latest", v1, ("linux/amd64",)),
        ("v1", v1, ("linux/amd64",)),
    ]
    assert registry.heads == 2
    v2 = registry.push("team/app", "v2", b"two")
    events.add("team/app", "push", "v2", v2)
    events.add("team/app", "delete", None, v1)
    assert [r.tag for r in content.tags("team/app")] == ["v2"]
    assert registry.heads == 2  # nothing asked again: the events said it
    now[0] += content.REFRESH + 1  # old: listed again, in the background
    content.tags("team/app")
    for _ in range(100):
        if registry.heads > 2:
            break
        time.sleep(0.01)
    assert registry.heads > 2


def test_a_tag_whose_manifest_another_tag_holds_is_refused_and_nothing_deleted(setup) -> None:
    registry, _, content, _ = setup
    registry.push("team/app", "v1", b"one")
    registry.push("team/app", "latest", b"one")
    with pytest.raises(
        UsageError, match=r"team/app:v1: its manifest stays \(still tagged latest\)"
    ):
        content.delete_tags([("team/app", "v1")])
    assert registry.deleted == []
    v2 = registry.push("team/app", "v2", b"two")
    content.forget(["team/app"])
    plan = content.delete_tags([("team/app", "v2")])
    assert registry.deleted == [v2] and plan.lines()[0].startswith("team/app:v2 removed;")
    assert [r.tag for r in content.tags("team/app")] == ["latest", "v1"]


def test_repository_sizes_count_a_shared_layer_once(setup) -> None:
    registry, _, content, _ = setup
    registry.push("team/app", "v1", b"base" * 1000)
    registry.push("team/app", "v2", b"base" * 1000)  # the same image: counted once
    registry.push("team/other", "v1", b"x")
    [row] = content.repositories("team/app", sizes=True)
    assert row.name == "team/app" and row.tags == 2
    assert 4000 < row.size < 5000
