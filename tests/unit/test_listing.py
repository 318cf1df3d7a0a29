"""What the pages list of the registry's content (appliance/auth/listing.py), over a
registry that answers from a dictionary: where tags point (events first, HEAD for the
rest), what a digest is (an image, an index), pushed by, last pulled by a client."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from appliance.auth.listing import RegistryListing
from appliance.auth.store import RegistryEvent, Store, ensure_schema

INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass
class Reply:
    body: bytes
    headers: dict

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class DictRegistry:
    """The registry's answers the listing asks for, counted."""

    tags_of: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> tag -> digest
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def tags(self, repository: str) -> list[str]:
        self.calls.append("tags")
        return sorted(self.tags_of.get(repository, {}))

    def digest(self, repository: str, tag: str) -> str | None:
        self.calls.append(f"head {tag}")
        return self.tags_of.get(repository, {}).get(tag)

    def manifest(self, repository: str, reference: str) -> Reply | None:
        self.calls.append(f"manifest {reference[:15]}")
        body = self.manifests.get(reference)
        return Reply(body, {"docker-content-digest": reference}) if body else None

    def blob(self, repository: str, digest: str) -> bytes | None:
        self.calls.append(f"blob {digest[:15]}")
        return self.blobs.get(digest)

    def add_image(self, arch: str, layer_size: int) -> str:
        config = json.dumps(
            {"os": "linux", "architecture": arch, "created": "2026-01-02T03:04:05Z"}
        ).encode()
        self.blobs[digest_of(config)] = config
        body = json.dumps(
            {
                "mediaType": IMAGE,
                "config": {"digest": digest_of(config), "size": len(config)},
                "layers": [{"digest": "sha256:" + "0" * 64, "size": layer_size}],
            }
        ).encode()
        self.manifests[digest_of(body)] = body
        return digest_of(body)

    def add_index(self, children: dict[str, str]) -> str:
        body = json.dumps(
            {
                "mediaType": INDEX,
                "manifests": [
                    {"digest": d, "size": 1, "platform": {"os": "linux", "architecture": a}}
                    for a, d in children.items()
                ],
            }
        ).encode()
        self.manifests[digest_of(body)] = body
        return digest_of(body)


def event(action: str, tag: str | None, digest: str, actor: str, at: float) -> RegistryEvent:
    return RegistryEvent(
        f"{action}-{tag}-{digest}-{actor}-{at}",
        action,
        "team/app",
        tag,
        digest,
        IMAGE,
        1,
        actor,
        "127.0.0.1",
        "skopeo",
        at,
    )


def test_tags_with_their_facts_history_and_pulls(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    ensure_schema(database)
    store = Store(database)
    registry = DictRegistry()
    amd = registry.add_image("amd64", 1000)
    arm = registry.add_image("arm64", 2000)
    multi = registry.add_index({"amd64": amd, "arm64": arm})
    registry.tags_of["team/app"] = {"v1": amd, "multi": multi, "old": amd}
    store.record_events(
        [
            event("push", "v1", arm, "alice", 10.0),
            event("push", "v1", amd, "bob", 20.0),  # the newest push of v1 wins
            event("push", "multi", multi, "alice", 30.0),
            event("pull", "v1", amd, "carol", 40.0),
            event("pull", None, amd, "appliance-auth", 50.0),  # our own read
        ]
    )
    listing = RegistryListing(store, lambda: registry)
    rows = {row.tag: row for row in listing.tags("team/app")}
    assert set(rows) == {"v1", "multi", "old"}
    assert rows["v1"].digest == amd and rows["v1"].pushed_by == "bob"
    assert rows["v1"].pushed_at == 20.0 and rows["v1"].last_pulled == 40.0
    assert rows["v1"].platforms == ("linux/amd64",)
    assert rows["v1"].created == "2026-01-02T03:04:05Z"
    assert rows["old"].digest == amd and rows["old"].pushed_at is None  # from a HEAD
    assert "head old" in registry.calls and "head v1" not in registry.calls
    assert rows["multi"].platforms == ("linux/amd64", "linux/arm64")
    assert rows["multi"].size == len(registry.manifests[multi]) + rows["v1"].size + (
        len(registry.manifests[arm])
        + len(
            registry.blobs[
                digest_of(
                    json.dumps(
                        {"os": "linux", "architecture": "arm64", "created": "2026-01-02T03:04:05Z"}
                    ).encode()
                )
            ]
        )
        + 2000
    )
    # A digest is read once: the second listing asks only for the tags and the HEAD.
    registry.calls.clear()
    listing.tags("team/app")
    assert registry.calls == ["tags", "head old"]


def test_a_digest_the_registry_no_longer_has(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    ensure_schema(database)
    registry = DictRegistry(tags_of={"team/app": {"gone": "sha256:" + "1" * 64}})
    rows = RegistryListing(Store(database), lambda: registry).tags("team/app")
    assert [(r.tag, r.size, r.platforms) for r in rows] == [("gone", 0, ())]


def test_one_tag_is_asked_of_the_registry(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    ensure_schema(database)
    store = Store(database)
    registry = DictRegistry()
    amd, arm = registry.add_image("amd64", 10), registry.add_image("arm64", 20)
    registry.tags_of["team/app"] = {"v1": amd}
    store.record_events([event("push", "v1", arm, "alice", 10.0)])  # moved since, unseen
    listing = RegistryListing(store, lambda: registry)
    row = listing.tag("team/app", "v1")
    assert row.digest == amd and row.pushed_by is None and row.platforms == ("linux/amd64",)
    assert "tags" not in registry.calls
    assert listing.tag("team/app", "nope") is None


def test_service_content_refuses_a_shared_manifest_and_deletes_a_lone_one(tmp_path: Path) -> None:
    from appliance.auth.listing import ServiceContent
    from appliance.errors import UsageError

    database = tmp_path / "auth.db"
    ensure_schema(database)
    registry = DictRegistry()
    amd, arm = registry.add_image("amd64", 10), registry.add_image("arm64", 20)
    registry.tags_of["team/app"] = {"v1": amd, "latest": amd, "arm": arm}
    deleted: list[str] = []
    registry.delete_manifest = lambda repository, digest: deleted.append(digest) or True
    content = ServiceContent(RegistryListing(Store(database), lambda: registry))
    try:
        content.delete_tags([("team/app", "v1")])
    except UsageError as error:
        assert "same manifest as latest" in str(error)
    else:
        raise AssertionError("a manifest two tags share was deleted")
    assert deleted == []
    plan = content.delete_tags([("team/app", "arm")])
    assert deleted == [arm]
    assert plan.lines() == [f"team/app:arm removed; manifest {arm[:19]} deleted"]
