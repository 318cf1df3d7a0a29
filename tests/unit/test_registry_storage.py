"""The storage reader and its decisions, on a storage tree laid out as Distribution 2.8
lays it out (written here, file by file; the integration tests read the real one)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.registry_storage import (
    V2,
    FilesystemStorage,
    StorageError,
    check_repository_name,
    reachable,
    read_content,
    size_of,
    storage_lock,
    untagged,
    usage,
)


class Layout:
    """Writes blobs, manifests, tags and links under a filesystem storage root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        hex_digest = digest[7:]
        path = self.root / V2 / "blobs/sha256" / hex_digest[:2] / hex_digest / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    def link(self, repository: str, kind: str, digest: str) -> None:
        path = self.root / V2 / "repositories" / repository / kind / "sha256" / digest[7:] / "link"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(digest)

    def image(self, repository: str, layers: list[bytes], tag: str | None = None) -> str:
        config = self.blob(
            json.dumps(
                {"architecture": "amd64", "repository": repository, "layers": len(layers)}
            ).encode()
        )
        descriptors = []
        for layer in layers:
            digest = self.blob(layer)
            self.link(repository, "_layers", digest)
            descriptors.append({"digest": digest, "size": len(layer)})
        self.link(repository, "_layers", config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"digest": config, "size": len(self.read(config))},
                "layers": descriptors,
            }
        ).encode()
        return self.manifest(repository, manifest, tag)

    def index(self, repository: str, children: dict[str, str], tag: str | None) -> str:
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "digest": digest,
                        "size": len(self.read(digest)),
                        "platform": {"os": "linux", "architecture": arch},
                    }
                    for arch, digest in children.items()
                ],
            }
        ).encode()
        return self.manifest(repository, body, tag)

    def manifest(self, repository: str, body: bytes, tag: str | None) -> str:
        digest = self.blob(body)
        self.link(repository, "_manifests/revisions", digest)
        if tag:
            self.tag(repository, tag, digest)
        return digest

    def tag(self, repository: str, tag: str, digest: str) -> None:
        base = self.root / V2 / "repositories" / repository / "_manifests/tags" / tag
        (base / "current").mkdir(parents=True, exist_ok=True)
        (base / "current/link").write_text(digest)
        self.link(repository, f"_manifests/tags/{tag}/index", digest)

    def read(self, digest: str) -> bytes:
        hex_digest = digest[7:]
        return (self.root / V2 / "blobs/sha256" / hex_digest[:2] / hex_digest / "data").read_bytes()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "storage")


def test_tags_revisions_and_blob_sizes_are_read(layout):
    v1 = layout.image("team/app", [b"base" * 100, b"app-v1"], tag="v1")
    layout.tag("team/app", "latest", v1)
    content = read_content(FilesystemStorage(layout.root))
    repository = content.repositories["team/app"]
    assert repository.tags == {"v1": v1, "latest": v1}
    assert repository.revisions == {v1}
    manifest = content.manifests[v1]
    assert [b.size for b in manifest.blobs][1:] == [400, 6]
    assert content.blobs[v1] == manifest.size


def test_children_of_a_tagged_index_are_reachable_and_only_orphans_are_untagged(layout):
    amd64 = layout.image("team/multi", [b"amd64-layer"])
    arm64 = layout.image("team/multi", [b"arm64-layer"])
    index = layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="v1")
    old = layout.image("team/multi", [b"old-layer"])  # its tag was moved away
    content = read_content(FilesystemStorage(layout.root))
    assert reachable(content, content.repositories["team/multi"]) == {index, amd64, arm64}
    assert untagged(content) == {"team/multi": [old]}
    assert content.manifests[index].is_index
    assert [c.platform for c in content.manifests[index].children] == [
        "linux/amd64",
        "linux/arm64",
    ]
    expected = sum(
        len(layout.read(d))
        for d in {index, amd64, arm64}
        | {b.digest for m in (amd64, arm64) for b in content.manifests[m].blobs}
    )
    assert size_of(content, index) == expected


def test_a_layer_shared_by_two_projects_counts_once_in_the_total_and_as_shared_in_each(layout):
    base = b"shared-base" * 1000
    layout.image("team/app", [base, b"app"], tag="v1")
    layout.image("other/tool", [base, b"tool"], tag="v1")
    content = read_content(FilesystemStorage(layout.root))
    figures = usage(content, lambda name: name.split("/")[0])
    assert figures.referenced == figures.total  # nothing unreferenced yet
    assert figures.groups["team"] + figures.groups["other"] == figures.total + len(base)
    assert figures.shared == {"other": len(base), "team": len(base)}


def test_unreferenced_blobs_count_in_the_total_not_in_any_group(layout):
    layout.image("team/app", [b"kept"], tag="v1")
    garbage = layout.blob(b"left behind by a deleted manifest")
    figures = usage(read_content(FilesystemStorage(layout.root)), lambda n: n)
    assert figures.total - figures.referenced == len(layout.read(garbage))


def test_the_walk_can_be_limited_to_some_repositories(layout):
    layout.image("team/app", [b"a"], tag="v1")
    layout.image("team/other", [b"b"], tag="v1")
    content = read_content(FilesystemStorage(layout.root), ["team/other"])
    assert set(content.repositories) == {"team/other"}


@pytest.mark.parametrize("name", ["", "/abs", "team/../x", "team//x", "team/_uploads", "."])
def test_names_that_could_leave_the_repositories_directory_are_refused(name):
    with pytest.raises(StorageError, match="not a repository name"):
        check_repository_name(name)


def test_a_second_holder_of_the_storage_lock_is_refused_with_the_first_named(tmp_path):
    lock = tmp_path / "storage.lock"
    with storage_lock(lock, "garbage collection"):
        with pytest.raises(StorageError, match=r"busy \(garbage collection, pid \d+\)"):
            with storage_lock(lock, "tag delete"):
                pass
    with storage_lock(lock, "tag delete"):  # free again
        pass
