"""The registry's storage as Distribution 2.8 lays it out, read (and pruned) directly.

Distribution has no API for what an admin asks first ("what takes the space?", "which
manifests does nothing point at?", "remove this repository"): its catalog lists names,
its tags/list lists tags, and it deletes manifests by digest only. Its storage layout
answers all of them, for the filesystem and the s3 driver alike:

    docker/registry/v2/blobs/sha256/<2>/<hex>/data                      every blob, once
    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link
    docker/registry/v2/repositories/<name>/_manifests/revisions/sha256/<hex>/link
    docker/registry/v2/repositories/<name>/_layers/sha256/<hex>/link
    docker/registry/v2/repositories/<name>/_uploads/<id>/...

`read_content` turns a storage into a `Content` snapshot; everything that decides
(reachability, untagged manifests, usage) is a pure function of a snapshot, so the
garbage collection's plan, `repo list --sizes` and the quota figures agree by
construction and are tested as tables. Writes (a tag or a repository removed) happen
under `storage_lock`, the lock every run that changes storage holds.

The caller passes the registry's `storage` hash (`recipes.registry.storage`), so this
module knows the layout, not the recipes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from appliance.errors import ApplianceError

V2 = "docker/registry/v2"
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


class StorageError(ApplianceError):
    """The registry's storage cannot be read or changed; the sentence says what to check."""


class Storage(Protocol):
    """Paths are relative to the registry's root directory, '/'-separated."""

    description: str  # "filesystem /var/opt/appliance/registry/data", "s3 bucket registry"

    def walk(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Every file under `prefix` (recursively) with its size."""
        ...

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, data: bytes) -> None:
        """Put `data` at `path` whole (a reader sees the old content or the new)."""
        ...

    def delete(self, prefix: str) -> None:
        """Remove `prefix` and everything under it (nothing when it is not there)."""
        ...


@dataclass
class FilesystemStorage:
    root: Path

    @property
    def description(self) -> str:
        return f"filesystem {self.root}"

    def walk(self, prefix: str) -> Iterator[tuple[str, int]]:
        top = self.root / prefix
        for directory, _, files in os.walk(top):
            for name in files:
                path = Path(directory) / name
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # removed while walking (an upload finished)
                    continue
                yield path.relative_to(self.root).as_posix(), size

    def read(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except OSError as error:
            raise StorageError(
                f"cannot read {self.root / path}: {error.strerror}; check the registry's "
                f"storage (run as root, or as the registry's account)."
            ) from error

    def write(self, path: str, data: bytes) -> None:
        from appliance.resources import atomic_write

        target = self.root / path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data, 0o644)
        except OSError as error:
            raise StorageError(
                f"cannot write {target}: {error.strerror}; check the registry's storage "
                f"(run as root)."
            ) from error

    def delete(self, prefix: str) -> None:
        target = self.root / prefix
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


@dataclass
class S3Storage:
    """The s3 driver's bucket, through boto3 with the registry's own credentials."""

    parameters: dict
    client: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import boto3
        from botocore.config import Config

        p = self.parameters
        endpoint = p.get("regionendpoint") or None
        if endpoint and "://" not in endpoint:
            endpoint = ("https://" if p.get("secure", True) else "http://") + endpoint
        self.bucket = str(p["bucket"])
        self.prefix = str(p.get("rootdirectory") or "").strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=str(p.get("region") or "us-east-1"),
            aws_access_key_id=p.get("accesskey") or None,
            aws_secret_access_key=p.get("secretkey") or None,
            verify=not p.get("skipverify", False),
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    @property
    def description(self) -> str:
        return f"s3 bucket {self.bucket}" + (f" under /{self.prefix}" if self.prefix else "")

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _fail(self, what: str, error: Exception) -> StorageError:
        return StorageError(
            f"cannot {what} in {self.description}: {error}; check registry.storage.s3 "
            f"(endpoint, credentials, bucket policy)."
        )

    def walk(self, prefix: str) -> Iterator[tuple[str, int]]:
        from botocore.exceptions import BotoCoreError, ClientError

        start = len(self.prefix) + 1 if self.prefix else 0
        key = self._key(prefix).rstrip("/") + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=key
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][start:], int(item["Size"])
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"list {key}", error) from error

    def read(self, path: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"read {self._key(path)}", error) from error

    def write(self, path: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data)
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"write {self._key(path)}", error) from error

    def delete(self, prefix: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        keys = [path for path, _ in self.walk(prefix)]
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            # A single object (a link file) is not a prefix: delete it by name too.
            self.client.delete_object(Bucket=self.bucket, Key=self._key(prefix))
        except (BotoCoreError, ClientError) as error:
            raise self._fail(f"delete {self._key(prefix)}", error) from error


def open_storage(storage: dict) -> Storage:
    """The storage the registry's `storage` hash describes."""
    if "filesystem" in storage:
        return FilesystemStorage(Path(storage["filesystem"]["rootdirectory"]))
    if "s3" in storage:
        return S3Storage(dict(storage["s3"]))
    driver = next((k for k in storage if k not in ("delete", "cache", "redirect")), "?")
    raise StorageError(
        f"the {driver} storage driver cannot be inspected by the appliance (filesystem and "
        f"s3 can); use the registry's API or the driver's own tools."
    )


# ---------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str = ""
    platform: str = ""  # "linux/amd64" for an index's child


@dataclass(frozen=True)
class Manifest:
    digest: str
    size: int
    media_type: str
    blobs: tuple[Descriptor, ...]  # config and layers (what a GC keeps for it)
    children: tuple[Descriptor, ...]  # an index's manifests

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES or bool(self.children)


@dataclass
class Repository:
    name: str
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    revisions: set[str] = field(default_factory=set)  # every manifest digest linked
    layers: set[str] = field(default_factory=set)  # every blob digest linked


@dataclass
class Content:
    repositories: dict[str, Repository]
    manifests: dict[str, Manifest]  # by digest; those found among the blobs
    blobs: dict[str, int]  # every blob in storage -> size

    def manifest(self, digest: str) -> Manifest | None:
        return self.manifests.get(digest)


def blob_path(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"{V2}/blobs/{algorithm}/{hex_digest[:2]}/{hex_digest}/data"


def parse_manifest(digest: str, raw: bytes) -> Manifest:
    """The blobs and children a manifest references (docker v2, OCI, schema1, indexes)."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    media_type = str(body.get("mediaType") or "")
    children = []
    for item in body.get("manifests") or []:
        platform = item.get("platform") or {}
        name = "/".join(
            part
            for part in (platform.get("os"), platform.get("architecture"), platform.get("variant"))
            if part
        )
        children.append(
            Descriptor(item["digest"], int(item.get("size", 0)), item.get("mediaType", ""), name)
        )
    if children and not media_type:
        media_type = "application/vnd.oci.image.index.v1+json"
    blobs = []
    config = body.get("config")
    if isinstance(config, dict) and "digest" in config:
        blobs.append(Descriptor(config["digest"], int(config.get("size", 0)), "config"))
    for layer in body.get("layers") or []:
        blobs.append(Descriptor(layer["digest"], int(layer.get("size", 0)), "layer"))
    for layer in body.get("fsLayers") or []:  # schema1: sizes are read from storage
        blobs.append(Descriptor(layer["blobSum"], 0, "layer"))
    return Manifest(digest, len(raw), media_type, tuple(blobs), tuple(children))


def _link_digest(storage: Storage, path: str) -> str | None:
    try:
        text = storage.read(path).decode("ascii", "replace").strip()
    except StorageError:
        return None
    return text if text.startswith("sha256:") else None


def _walk_repositories(storage: Storage, wanted: set[str] | None) -> Iterator[tuple[str, int]]:
    """The files of the repositories directory, or only of the wanted repositories'
    subtrees (a tag list of one repository need not walk a thousand others). A wanted
    name nested under another wanted one is inside that one's walk already."""
    if wanted is None:
        yield from storage.walk(f"{V2}/repositories")
        return
    for name in sorted(wanted):
        parts = name.split("/")
        if not any("/".join(parts[:n]) in wanted for n in range(1, len(parts))):
            yield from storage.walk(repository_prefix(name))


def read_content(storage: Storage, repositories: Iterable[str] | None = None) -> Content:
    """A snapshot of the storage: repositories with tags and links, every manifest they
    link, every blob with its size. `repositories` limits the walk to those names."""
    blobs: dict[str, int] = {}
    for path, size in storage.walk(f"{V2}/blobs"):
        parts = path.split("/")
        if parts[-1] == "data" and len(parts) >= 4:
            blobs[f"{parts[-4]}:{parts[-2]}"] = size
    wanted = set(repositories) if repositories is not None else None
    found: dict[str, Repository] = {}
    tag_links: list[tuple[Repository, str, str]] = []
    for path, _ in _walk_repositories(storage, wanted):
        relative = path[len(V2) + len("/repositories/") :]
        markers = ("/_manifests/", "/_layers/", "/_uploads/")
        marker = next((m for m in markers if m in relative), None)
        if marker is None:
            continue
        name, rest = relative.split(marker, 1)
        if wanted is not None and name not in wanted:
            continue
        repository = found.setdefault(name, Repository(name))
        parts = rest.split("/")
        if marker == "/_manifests/":
            if parts[0] == "tags" and len(parts) == 4 and parts[2:] == ["current", "link"]:
                tag_links.append((repository, parts[1], path))
            elif parts[0] == "revisions" and len(parts) == 4 and parts[3] == "link":
                repository.revisions.add(f"{parts[1]}:{parts[2]}")
        elif marker == "/_layers/" and len(parts) == 3 and parts[2] == "link":
            repository.layers.add(f"{parts[0]}:{parts[1]}")
    for repository, tag, path in tag_links:
        digest = _link_digest(storage, path)
        if digest:
            repository.tags[tag] = digest
    manifests: dict[str, Manifest] = {}
    for repository in found.values():
        for digest in repository.revisions | set(repository.tags.values()):
            if digest in manifests or digest not in blobs:
                continue
            manifest = parse_manifest(digest, storage.read(blob_path(digest)))
            manifests[digest] = Manifest(
                digest,
                manifest.size,
                manifest.media_type,
                tuple(
                    Descriptor(b.digest, b.size or blobs.get(b.digest, 0), b.media_type)
                    for b in manifest.blobs
                ),
                manifest.children,
            )
    return Content(found, manifests, blobs)


# ---------------------------------------------------------------- decisions (pure)


def reachable(content: Content, repository: Repository) -> set[str]:
    """The manifests a tag of `repository` reaches: tagged ones and, recursively, the
    children of a tagged index (Distribution 2.8's `-m` forgets those: distribution#3004)."""
    seen: set[str] = set()
    todo = list(repository.tags.values())
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = content.manifest(digest)
        if manifest is not None:
            todo.extend(child.digest for child in manifest.children)
    return seen


def untagged(content: Content) -> dict[str, list[str]]:
    """Per repository, the manifests no tag reaches (what `--delete-untagged` deletes)."""
    return {
        name: sorted(repository.revisions - reachable(content, repository))
        for name, repository in sorted(content.repositories.items())
        if repository.revisions - reachable(content, repository)
    }


def referenced_blobs(content: Content, repository: Repository) -> dict[str, int]:
    """Every blob `repository`'s manifests hold in storage: the manifests themselves and
    their configs and layers (all revisions: storage keeps untagged ones until a GC)."""
    held: dict[str, int] = {}
    for digest in repository.revisions | set(repository.tags.values()):
        manifest = content.manifest(digest)
        if manifest is None:
            continue
        held[digest] = content.blobs.get(digest, manifest.size)
        for blob in manifest.blobs:
            held[blob.digest] = content.blobs.get(blob.digest, blob.size)
    return held


def size_of(content: Content, digest: str) -> int:
    """A manifest's size with what it references (an index: its children's too)."""
    manifest = content.manifest(digest)
    if manifest is None:
        return 0
    held = {digest: manifest.size, **{b.digest: b.size for b in manifest.blobs}}
    for child in manifest.children:
        child_manifest = content.manifest(child.digest)
        held[child.digest] = child.size
        if child_manifest:
            held.update({b.digest: b.size for b in child_manifest.blobs})
    return sum(held.values())


@dataclass(frozen=True)
class Usage:
    """Bytes as storage holds them: a blob counts once in a total however many use it."""

    total: int  # every blob in storage (what the disk holds)
    referenced: int  # blobs some repository's manifest holds (the rest a GC frees)
    groups: dict[str, int]  # group (project or repository) -> its distinct blobs' bytes
    shared: dict[str, int]  # group -> bytes of those blobs another group holds too


def usage(content: Content, group_of: Callable[[str], str]) -> Usage:
    """Usage per group of repositories (`group_of(repository name)`: a project path,
    or the name itself for per-repository figures)."""
    by_group: dict[str, dict[str, int]] = {}
    for name, repository in content.repositories.items():
        by_group.setdefault(group_of(name), {}).update(referenced_blobs(content, repository))
    holders: dict[str, int] = {}
    for blobs in by_group.values():
        for digest in blobs:
            holders[digest] = holders.get(digest, 0) + 1
    all_referenced: dict[str, int] = {}
    for blobs in by_group.values():
        all_referenced.update(blobs)
    return Usage(
        total=sum(content.blobs.values()),
        referenced=sum(all_referenced.values()),
        groups={g: sum(b.values()) for g, b in sorted(by_group.items())},
        shared={
            g: sum(size for digest, size in b.items() if holders[digest] > 1)
            for g, b in sorted(by_group.items())
        },
    )


# ---------------------------------------------------------------- changes


def repository_prefix(name: str) -> str:
    return f"{V2}/repositories/{name}"


def tag_prefix(repository: str, tag: str) -> str:
    return f"{repository_prefix(repository)}/_manifests/tags/{tag}"


def check_repository_name(name: str) -> str:
    """A repository name as Distribution accepts one; refuses what could leave the
    repositories directory (.., absolute paths)."""
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or any(part in ("", ".", "..") or part.startswith("_") for part in name.split("/"))
    ):
        raise StorageError(f"{name!r} is not a repository name (like team/app).")
    return name


@contextmanager
def storage_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Held by every run that changes the registry's storage outside the registry
    (garbage collection, tag and repository deletion): one at a time. `what` names the
    holder in the refusal another run gets."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another run"
            raise StorageError(
                f"the registry's storage is busy ({holder}); wait for it to end and run this again."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what}, pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
