"""What the registry holds, as an admin lists and deletes it: repositories and tags.

Listings read the registry's storage directly (`registry_storage`), not its API: one
walk sees every repository, a tagless one included (the catalog lists it but tags/list
answers nothing useful), and the sizes are those the garbage collection and the usage
report compute from the same kind of snapshot. The API would cost a request per tag
and per manifest (~1 ms of registry CPU each on 2.8) and know nothing of sizes.

Deletes go through the registry's API wherever it has one, so the registry clears
what it cached and its notification endpoints see each delete: manifests by digest,
and a deleted repository's blob links. What Distribution has no API for is done in
storage: removing one tag (Distribution deletes manifests, and every tag on a manifest
goes with it) and removing a repository's directory (there is no repository DELETE).
Both run under `storage_lock`, the lock the garbage collection holds, so a delete never
runs during a GC. Nothing is freed on disk here: the next garbage collection removes
the blobs no manifest uses any more.

`tag delete` keeps the other tags: a tag whose manifest another tag of the repository
still reaches (the same digest, or a platform of a still-tagged index) is only
unlinked; a manifest no remaining tag reaches is deleted, an index together with the
platform manifests no remaining tag reaches. Every argument is checked before anything
is deleted. The decisions (`plan_tag_delete`, `plan_repository_delete`) are pure
functions of a `Content` snapshot, tested as tables.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ApplianceError, UsageError
from appliance.registry_storage import (
    V2,
    Content,
    FilesystemStorage,
    Manifest,
    Repository,
    Storage,
    StorageError,
    blob_path,
    check_repository_name,
    parse_manifest,
    reachable,
    read_content,
    repository_prefix,
    size_of,
    storage_lock,
    tag_prefix,
    usage,
)

if TYPE_CHECKING:
    from appliance.registry_api import RegistryAPI

# Distribution's grammar (reference/regexp.go): lowercase path components joined by '/',
# separators inside a component; a tag is up to 128 word characters, dots and dashes.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"\w[\w.-]{0,127}")
_DATE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|z|[+-]\d\d:\d\d)")
REPOSITORY_PARTS = ("_manifests", "_layers", "_uploads")
GC_NOTE = (
    "Their blobs stay on disk until the next garbage collection "
    "(appliance-ctl registry-garbage-collect)."
)


# ---------------------------------------------------------------- names


def check_repository(name: str) -> str:
    """A repository name as Distribution accepts one, or a sentence saying why not."""
    if "@" in name:
        raise UsageError(f"{name!r} names a digest; give a repository name such as team/app.")
    try:
        check_repository_name(name)
    except StorageError as error:
        raise UsageError(str(error)) from None
    if not all(_COMPONENT.fullmatch(part) for part in name.split("/")) or len(name) > 255:
        raise UsageError(
            f"{name!r} is not a repository name: lowercase letters and digits, with "
            f"'.', '_' or '-' inside a component, components joined by '/' (like team/app)."
        )
    return name


def parse_tag_reference(text: str) -> tuple[str, str]:
    """'team/app:v1' -> ('team/app', 'v1'); anything else gets a sentence."""
    if "@" in text:
        raise UsageError(
            f"{text!r} names a digest; tag delete takes REPOSITORY:TAG (like team/app:v1)."
        )
    name, colon, tag = text.rpartition(":")
    if not colon or not name or not tag or "/" in tag:
        raise UsageError(f"{text!r} names no tag; give REPOSITORY:TAG, like team/app:v1.")
    if not _TAG.fullmatch(tag):
        raise UsageError(
            f"{tag!r} (in {text!r}) is not a tag: up to 128 letters, digits, '_', '.' "
            f"and '-', not starting with '.' or '-'."
        )
    return check_repository(name), tag


def under(name: str, path: str) -> bool:
    """Is repository `name` at or below `path` (component-wise: team/app2 is not under
    team/app)?"""
    return name == path or name.startswith(path + "/")


def owning_project(repository: str, projects: Iterable[str]) -> str | None:
    """The project a repository belongs to: the longest project path it is under (the
    token service's rule)."""
    found = [path for path in projects if under(repository, path)]
    return max(found, key=len) if found else None


def short_digest(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}:{hex_digest[:12]}"


# ---------------------------------------------------------------- listings


@dataclass(frozen=True)
class RepositoryRow:
    name: str
    project: str | None
    tags: int
    size: int | None  # bytes of its distinct blobs (with --sizes), else None

    def to_json(self) -> dict:
        row: dict = {"name": self.name, "project": self.project, "tags": self.tags}
        if self.size is not None:
            row["size"] = self.size
        return row


@dataclass(frozen=True)
class PlatformManifest:
    """One platform's manifest of an index: what `docker pull REPO@DIGEST` fetches for
    that platform alone, and what a scanner or a signature names."""

    platform: str
    digest: str
    size: int  # the manifest and its blobs

    def to_json(self) -> dict:
        return {"platform": self.platform, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class TagRow:
    tag: str
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    size: int  # the manifest and everything it references (an index: its children's too)
    created: dt.datetime | None  # the image config's; an index's: its newest child's
    manifests: tuple[PlatformManifest, ...] = ()  # an index's platform manifests

    def to_json(self) -> dict:
        return {
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.media_type,
            "platforms": list(self.platforms),
            "size": self.size,
            "created": format_created(self.created),
            "manifests": [m.to_json() for m in self.manifests],
        }


def format_created(created: dt.datetime | None) -> str | None:
    return created.strftime("%Y-%m-%dT%H:%M:%SZ") if created else None


def parse_created(value: object) -> dt.datetime | None:
    """An image config's `created` (RFC 3339, nanoseconds allowed) in UTC; None for a
    missing or unreadable one (`created` is optional in the OCI spec)."""
    if not isinstance(value, str):
        return None
    match = _DATE.fullmatch(value.strip())
    if not match:
        return None
    seconds, fraction, zone = match.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        parsed = dt.datetime.fromisoformat(seconds + (fraction or "")[:7] + zone)
    except ValueError:
        return None
    return parsed.astimezone(dt.UTC)


def repository_rows(
    content: Content,
    path: str | None = None,
    project_of: Callable[[str], str | None] = lambda name: None,
    sizes: bool = False,
) -> list[RepositoryRow]:
    """The repositories under `path` (all when None), each with its project, tag count
    and, with `sizes`, the bytes of the distinct blobs it holds (a layer used by two of
    its tags counts once; one shared with another repository counts in both)."""
    names = sorted(n for n in content.repositories if path is None or under(n, path))
    figures: dict[str, int] = {}
    if sizes:
        listed = Content(
            {n: content.repositories[n] for n in names}, content.manifests, content.blobs
        )
        figures = usage(listed, lambda name: name).groups
    return [
        RepositoryRow(
            name,
            project_of(name),
            len(content.repositories[name].tags),
            figures.get(name, 0) if sizes else None,
        )
        for name in names
    ]


def tag_rows(content: Content, storage: Storage, name: str) -> list[TagRow]:
    """Every tag of repository `name`: digest, platforms, size, creation date, and an
    index's platform manifests."""
    repository = _existing(content, name)
    configs: dict[str, dict] = {}

    def config_of(manifest: Manifest | None) -> dict:
        blob = (
            next((b for b in manifest.blobs if b.media_type == "config"), None)
            if manifest
            else None
        )
        if blob is None:
            return {}
        if blob.digest not in configs:
            try:
                body = json.loads(storage.read(blob_path(blob.digest)))
            except (StorageError, ValueError):
                body = {}
            configs[blob.digest] = body if isinstance(body, dict) else {}
        return configs[blob.digest]

    rows = []
    for tag, digest in sorted(repository.tags.items()):
        manifest = content.manifest(digest)
        if manifest is not None and manifest.is_index:
            platforms = tuple(child.platform or "unknown" for child in manifest.children)
            dates = [
                parse_created(config_of(content.manifest(child.digest)).get("created"))
                for child in manifest.children
            ]
            created = max((d for d in dates if d), default=None)
            manifests = tuple(
                PlatformManifest(
                    child.platform or "unknown", child.digest, size_of(content, child.digest)
                )
                for child in manifest.children
            )
        else:
            manifests = ()
            config = config_of(manifest)
            platform = "/".join(
                str(config[key]) for key in ("os", "architecture", "variant") if config.get(key)
            )
            platforms = (platform,) if platform else ()
            created = parse_created(config.get("created"))
        rows.append(
            TagRow(
                tag,
                digest,
                manifest.media_type if manifest else "",
                platforms,
                size_of(content, digest),
                created,
                manifests,
            )
        )
    return rows


def _existing(content: Content, name: str) -> Repository:
    repository = content.repositories.get(name)
    if repository is None:
        raise UsageError(f"There is no repository {name} in the registry.")
    return repository


# ---------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class TagRemoval:
    repository: str
    tag: str
    digest: str
    kept_because: str  # why its manifest stays ("still tagged latest"); "" if deleted


@dataclass(frozen=True)
class ManifestDeletion:
    repository: str
    digest: str
    is_index: bool
    children: tuple[str, ...]  # platform manifests deleted with an index


@dataclass(frozen=True)
class TagDeletePlan:
    removals: tuple[TagRemoval, ...]
    deletions: tuple[ManifestDeletion, ...]

    def lines(self) -> list[str]:
        """What was done, one line per tag: '<repo>:<tag> removed; ...'."""
        deleted = {(d.repository, d.digest): d for d in self.deletions}
        platforms = {(d.repository, c): d.digest for d in self.deletions for c in d.children}
        out = []
        for removal in self.removals:
            head = f"{removal.repository}:{removal.tag} removed; "
            key = (removal.repository, removal.digest)
            deletion = deleted.get(key)
            if key in platforms:
                out.append(
                    f"{head}manifest {short_digest(removal.digest)} deleted with index "
                    f"{short_digest(platforms[key])}"
                )
            elif deletion is None:
                out.append(f"{head}{short_digest(removal.digest)} kept: {removal.kept_because}")
            elif deletion.is_index:
                count = len(deletion.children)
                out.append(
                    f"{head}index {short_digest(removal.digest)} deleted with "
                    f"{count} platform manifest{'s' if count != 1 else ''}"
                )
            else:
                out.append(f"{head}manifest {short_digest(removal.digest)} deleted")
        return out


def plan_tag_delete(content: Content, references: Iterable[tuple[str, str]]) -> TagDeletePlan:
    """What `tag delete` removes and deletes. Every reference is checked first: an
    unknown repository or tag raises, naming all of them, before anything is planned."""
    wanted: dict[str, list[str]] = {}
    for name, tag in references:
        if tag not in wanted.setdefault(name, []):
            wanted[name].append(tag)
    problems = []
    for name, tags in wanted.items():
        repository = content.repositories.get(name)
        if repository is None:
            problems.append(f"no repository {name}")
            continue
        problems += [f"no tag {name}:{tag}" for tag in tags if tag not in repository.tags]
    if problems:
        raise UsageError(f"There is {' and '.join(problems)} in the registry; nothing was deleted.")
    removals: list[TagRemoval] = []
    deletions: list[ManifestDeletion] = []
    for name, tags in wanted.items():
        repository = content.repositories[name]
        remaining = Repository(
            name, tags={t: d for t, d in repository.tags.items() if t not in tags}
        )
        still = reachable(content, remaining)
        planned: set[str] = set()
        for tag in tags:
            digest = repository.tags[tag]
            if digest in still:
                removals.append(
                    TagRemoval(name, tag, digest, _kept_because(content, remaining, digest))
                )
                continue
            removals.append(TagRemoval(name, tag, digest, ""))
            if digest in planned:
                continue
            planned.add(digest)
            manifest = content.manifest(digest)
            children = tuple(
                child.digest
                for child in (manifest.children if manifest else ())
                if child.digest not in still
                and child.digest in repository.revisions
                and child.digest not in planned
            )
            planned.update(children)
            deletions.append(
                ManifestDeletion(name, digest, bool(manifest and manifest.is_index), children)
            )
    return TagDeletePlan(tuple(removals), tuple(deletions))


def _kept_because(content: Content, remaining: Repository, digest: str) -> str:
    direct = sorted(tag for tag, d in remaining.tags.items() if d == digest)
    if direct:
        return f"still tagged {', '.join(direct)}"
    parents = sorted(
        tag
        for tag, d in remaining.tags.items()
        if digest in reachable(content, Repository(remaining.name, tags={tag: d}))
    )
    return f"a platform of {', '.join(parents)}"


@dataclass(frozen=True)
class RepositoryDeletion:
    name: str
    tags: int
    manifests: tuple[str, ...]  # every manifest it links, indexes before their children
    blobs: tuple[str, ...]  # every blob it links (configs and layers)


def plan_repository_delete(content: Content, name: str) -> RepositoryDeletion:
    repository = _existing(content, name)
    digests = repository.revisions | set(repository.tags.values())

    def indexes_first(digest: str) -> tuple[bool, str]:
        manifest = content.manifest(digest)
        return (not (manifest and manifest.is_index), digest)

    return RepositoryDeletion(
        name,
        len(repository.tags),
        tuple(sorted(digests, key=indexes_first)),
        tuple(sorted(repository.layers)),
    )


# ---------------------------------------------------------------- the operations


class RegistryContent:
    """The commands' one way to the registry's content: its storage, its API (made only
    when a delete needs it: listings need no signing key) and the storage lock."""

    def __init__(
        self,
        storage: Storage,
        api: Callable[[], RegistryAPI],
        lock_file: Path,
        deletes_enabled: bool = True,
    ) -> None:
        self.storage = storage
        self._api_factory = api
        self._api: RegistryAPI | None = None
        self.lock_file = lock_file
        self.deletes_enabled = deletes_enabled

    def check_deletes(self) -> None:
        """With deletes off, the registry would refuse the manifests but not the tags we
        remove in storage: refuse the whole command instead, before anything changes."""
        if not self.deletes_enabled:
            raise UsageError(
                "Deletes are disabled in the registry (registry.storage_delete_enabled: "
                "false, or storage.delete.enabled); enable them and run appliance-ctl "
                "reconfigure. Nothing was deleted."
            )

    @property
    def api(self) -> RegistryAPI:
        if self._api is None:
            self._api = self._api_factory()
        return self._api

    def snapshot(self, repositories: Iterable[str] | None = None) -> Content:
        return read_content(self.storage, repositories)

    def repositories(
        self,
        path: str | None = None,
        project_of: Callable[[str], str | None] = lambda name: None,
        sizes: bool = False,
    ) -> list[RepositoryRow]:
        return repository_rows(self.snapshot(), path, project_of, sizes)

    def tags(self, name: str) -> list[TagRow]:
        check_repository(name)
        return tag_rows(self.snapshot([name]), self.storage, name)

    def project_repositories(self, project: str, projects: Iterable[str]) -> list[str]:
        """The repositories that belong to `project`: under its path and not under a
        deeper project (team/app/web belongs to team/app/web if that project exists)."""
        paths = list(projects)
        content = self.snapshot()
        return sorted(
            name
            for name in content.repositories
            if under(name, project) and owning_project(name, paths) == project
        )

    def delete_tags(self, references: Iterable[tuple[str, str]]) -> TagDeletePlan:
        """Remove the tags, deleting the manifests no remaining tag reaches (through the
        API first: a registry that refuses deletes refuses before any tag is gone)."""
        references = list(references)
        self.check_deletes()
        with storage_lock(self.lock_file, "tag delete"):
            plan = plan_tag_delete(self.snapshot({name for name, _ in references}), references)
            self._apply(plan)
        return plan

    def delete_unchanged_tags(
        self, expected: Mapping[tuple[str, str], str]
    ) -> tuple[TagDeletePlan, list[tuple[str, str]]]:
        """A retention run's delete (its caller holds the storage lock): each tag only if
        it still points at the digest the run's plan saw. A tag pushed again since (CI
        re-tagging a fresh image) or deleted meanwhile is skipped and returned, never
        deleted: the plan was about the image it saw, not about the name."""
        self.check_deletes()
        content = self.snapshot({name for name, _ in expected})
        unchanged = [
            (name, tag)
            for (name, tag), digest in expected.items()
            if name in content.repositories and content.repositories[name].tags.get(tag) == digest
        ]
        plan = plan_tag_delete(content, unchanged)
        self._apply(plan)
        return plan, [reference for reference in expected if reference not in set(unchanged)]

    def _apply(self, plan: TagDeletePlan) -> None:
        for deletion in plan.deletions:
            for digest in (deletion.digest, *deletion.children):
                self.api.delete_manifest(deletion.repository, digest)
        for removal in plan.removals:
            self.storage.delete(tag_prefix(removal.repository, removal.tag))

    def delete_repositories(
        self, names: Iterable[str], say: Callable[[str], None], holder: str = "repo delete"
    ) -> None:
        """Delete each repository: its manifests and blob links through the API, then
        what is left of it in storage (tag links, upload sessions), so it leaves the
        catalog and tags/list answers 404. A repository nested under it stays."""
        names = [check_repository(name) for name in names]
        self.check_deletes()
        with storage_lock(self.lock_file, holder):
            content = self.snapshot(names)
            plans = [plan_repository_delete(content, name) for name in names]
            for plan in plans:
                for digest in plan.manifests:
                    self.api.delete_manifest(plan.name, digest)
                for digest in plan.blobs:
                    self.api.delete_blob(plan.name, digest)
                for part in REPOSITORY_PARTS:
                    self.storage.delete(f"{repository_prefix(plan.name)}/{part}")
                self._prune_empty_directories(plan.name)
                say(
                    f"Deleted repository {plan.name} ({plan.tags} tag"
                    f"{'s' if plan.tags != 1 else ''}, {len(plan.manifests)} manifest"
                    f"{'s' if len(plan.manifests) != 1 else ''})."
                )

    def _prune_empty_directories(self, name: str) -> None:
        """A filesystem keeps the directories of a deleted repository (s3 has none):
        remove those left empty, up to the repositories directory."""
        if not isinstance(self.storage, FilesystemStorage):
            return
        top = self.storage.root / V2 / "repositories"
        directory = self.storage.root / repository_prefix(name)
        while directory != top and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent


# ---------------------------------------------------------------- through the API alone


class RegistryContentOverAPI:
    """The registry's content as the auth service sees it: through the registry's API
    alone, since the service's account cannot read the storage (appliance-ctl, as root,
    reads it: `RegistryContent`). The same snapshot (`Content`) is built from the
    catalog, tags/list and the manifests, so listings and delete plans are the same pure
    functions as `RegistryContent`'s.

    What the API cannot see or do, and how it shows:
    - manifests no tag reaches are invisible, so sizes count what tags reach (the
      storage walk counts untagged revisions until a GC), and a repository without tags
      is not listed (Distribution 2.8 keeps a deleted repository's directories, which
      the catalog still names);
    - Distribution 2.8 has no API to remove one tag: a manifest is deleted with every
      tag on it. A tag whose manifest another tag still reaches is refused with a
      sentence naming `appliance-ctl tag delete`, and nothing is deleted.
    Manifests are immutable by digest, so parsed ones and image configs are kept in a
    bounded cache. Tags are not, and asking the registry costs one HEAD per tag (2 s for
    1,000 tags, bench/api): with `changes` (the registry's events as the auth database
    records them, Store.manifest_changes) a repository's tags are listed once, then
    kept current by applying the pushes and deletes recorded since, and listed again
    in the background once older than REFRESH seconds (what no event tells: a tag
    removed in storage by appliance-ctl tag delete).
    """

    CACHE_SIZE = 20000
    WORKERS = 8
    REFRESH = 60.0

    def __init__(
        self,
        api: RegistryAPI,
        changes: Callable[[str, int], list[tuple[int, str, str | None, str | None]]] | None = None,
        last_change: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.changes, self.last_change, self.clock = changes, last_change, clock
        self._manifests: dict[str, Manifest] = {}
        self._configs: dict[str, bytes] = {}
        self._tags: dict[str, tuple[float, int, dict[str, str]]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def _tag_map(self, name: str) -> dict[str, str]:
        """The repository's tags and digests: from the cache kept current by the events,
        or from the registry (one HEAD per tag)."""
        if self.changes is None:
            return self._fetch_tags(name)
        cached = self._tags.get(name)
        if cached is None:
            return self._load_tags(name)
        listed_at, marker, tags = cached
        changes = self.changes(name, marker)
        if changes:
            tags = dict(tags)
            for event_id, action, tag, digest in changes:
                marker = event_id
                if action == "push" and tag and digest:
                    tags[tag] = digest
                elif action == "delete" and digest:
                    tags = {t: d for t, d in tags.items() if d != digest}
            self._remember(self._tags, name, (listed_at, marker, tags))
        if self.clock() - listed_at > self.REFRESH:
            self._refresh_later(name)
        return tags

    def _load_tags(self, name: str) -> dict[str, str]:
        marker = self.last_change() if self.last_change else 0
        tags = self._fetch_tags(name)
        with self._lock:
            self._remember(self._tags, name, (self.clock(), marker, tags))
        # what was pushed while listing is applied at the next use
        return tags

    def _refresh_later(self, name: str) -> None:
        with self._lock:
            if name in self._refreshing:
                return
            self._refreshing.add(name)

        def refresh() -> None:
            try:
                self._load_tags(name)
            except ApplianceError as error:
                print(f"appliance-auth: tags of {name}: {error}", flush=True)
            finally:
                with self._lock:
                    self._refreshing.discard(name)

        threading.Thread(target=refresh, name=f"tags {name}", daemon=True).start()

    def forget(self, names: Iterable[str]) -> None:
        """After a delete through this object: list those repositories again."""
        for name in names:
            self._tags.pop(name, None)

    def _fetch_tags(self, name: str) -> dict[str, str]:
        from concurrent.futures import ThreadPoolExecutor

        names = self.api.tags(name)
        with ThreadPoolExecutor(self.WORKERS) as pool:
            digests = list(pool.map(lambda tag: self.api.digest(name, tag), names))
        return {t: d for t, d in zip(names, digests, strict=True) if d is not None}

    def snapshot(self, repositories: Iterable[str] | None = None) -> Content:
        from concurrent.futures import ThreadPoolExecutor

        names = sorted(self.api.catalog() if repositories is None else set(repositories))
        with ThreadPoolExecutor(self.WORKERS) as pool:
            tag_maps = dict(zip(names, pool.map(self._tag_map, names), strict=True))
            found: dict[str, Repository] = {
                name: Repository(name, tags=dict(tag_maps[name]))
                for name in names
                if tag_maps[name]
            }
            wanted: dict[str, str] = {}
            for name, repository in found.items():
                for digest in repository.tags.values():
                    wanted.setdefault(digest, name)
            manifests: dict[str, Manifest] = {}
            while wanted:
                missing = [(d, n) for d, n in wanted.items() if d not in self._manifests]
                for (digest, _), manifest in zip(
                    missing,
                    pool.map(lambda item: self._fetch_manifest(item[1], item[0]), missing),
                    strict=True,
                ):
                    if manifest is not None:
                        self._remember(self._manifests, digest, manifest)
                children: dict[str, str] = {}
                for digest, name in wanted.items():
                    manifest = self._manifests.get(digest)
                    if manifest is None:
                        continue
                    manifests[digest] = manifest
                    for child in manifest.children:
                        if child.digest not in manifests:
                            children.setdefault(child.digest, name)
                wanted = children
        for repository in found.values():
            repository.revisions.update(reachable(Content(found, manifests, {}), repository))
            for digest in repository.revisions & manifests.keys():
                repository.layers.update(b.digest for b in manifests[digest].blobs)
        blobs = {b.digest: b.size for m in manifests.values() for b in m.blobs}
        blobs.update({m.digest: m.size for m in manifests.values()})
        return Content(found, manifests, blobs)

    def _fetch_manifest(self, repository: str, digest: str) -> Manifest | None:
        response = self.api.manifest(repository, digest)
        return None if response is None else parse_manifest(digest, response.body)

    def _remember(self, cache: dict, key: str, value: object) -> None:
        if len(cache) >= self.CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = value

    def repositories(
        self,
        path: str | None = None,
        project_of: Callable[[str], str | None] = lambda name: None,
        sizes: bool = False,
    ) -> list[RepositoryRow]:
        names = None
        if path is not None:
            names = [n for n in self.api.catalog() if under(n, path)]
        return repository_rows(self.snapshot(names), path, project_of, sizes)

    def tags(self, name: str) -> list[TagRow]:
        check_repository(name)
        return tag_rows(self.snapshot([name]), _ConfigsOverAPI(self, name), name)

    def delete_tags(self, references: Iterable[tuple[str, str]]) -> TagDeletePlan:
        references = list(references)
        plan = plan_tag_delete(self.snapshot({name for name, _ in references}), references)
        kept = [r for r in plan.removals if r.kept_because]
        if kept:
            names = ", ".join(f"{r.repository}:{r.tag}" for r in kept)
            raise UsageError(
                f"{names}: its manifest stays ({kept[0].kept_because}) and the registry "
                f"can only delete a manifest with all its tags; remove the tag on the host "
                f"with appliance-ctl tag delete {kept[0].repository}:{kept[0].tag}. "
                f"Nothing was deleted."
            )
        try:
            for deletion in plan.deletions:
                for digest in (deletion.digest, *deletion.children):
                    self.api.delete_manifest(deletion.repository, digest)
        finally:
            self.forget(name for name, _ in references)
        return plan

    def delete_repositories(
        self, names: Iterable[str], say: Callable[[str], None], holder: str = "repo delete"
    ) -> None:
        """Every manifest and blob link through the API: the repository then has no tags
        (and is no longer listed here); its empty directories stay for appliance-ctl."""
        names = [check_repository(name) for name in names]
        content = self.snapshot(names)
        self.forget(names)
        for plan in [plan_repository_delete(content, name) for name in names]:
            for digest in plan.manifests:
                self.api.delete_manifest(plan.name, digest)
            for digest in plan.blobs:
                self.api.delete_blob(plan.name, digest)
            say(
                f"Deleted repository {plan.name} ({plan.tags} tag"
                f"{'s' if plan.tags != 1 else ''}, {len(plan.manifests)} manifest"
                f"{'s' if len(plan.manifests) != 1 else ''})."
            )


class _ConfigsOverAPI:
    """The one read `tag_rows` makes of storage (an image's config blob), answered by
    the registry's API for one repository, cached by digest."""

    def __init__(self, content: RegistryContentOverAPI, repository: str) -> None:
        self.content, self.repository = content, repository

    def read(self, path: str) -> bytes:
        parts = path.split("/")  # .../blobs/<algorithm>/<xx>/<hex>/data
        digest = f"{parts[-4]}:{parts[-2]}"
        cached = self.content._configs.get(digest)
        if cached is None:
            data = self.content.api.blob(self.repository, digest)
            if data is None:
                raise StorageError(f"the registry has no blob {digest}")
            self.content._remember(self.content._configs, digest, data)
            cached = data
        return cached
