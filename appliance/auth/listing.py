"""What the auth service shows of the registry's content: repositories, and each tag
with its digest, platforms, size, when and by whom it was pushed, when last pulled.

The service cannot read the registry's storage (its account has no access; see
appliance/auth/usage.py), so it asks the registry's API on its own address, with
tokens it signs itself, and reads the registry's events (store.registry_events):

- which tags exist: one `tags/list` (the registry is the truth);
- where each tag points: the newest push event of that tag, else one HEAD (a tag pushed
  before events were recorded, or whose event was dropped from the kept history);
- what a digest is (type, platforms, size, creation date): its manifest and, for an
  image, its config blob, read once and kept in memory per worker. A digest names
  immutable content, so what was read never goes stale;
- pushed at and by, last pulled: the events.

So a page of a repository with 1,000 tags costs one registry request, two queries and
dictionary lookups once the digests are known (bench/web measures it); the first view
of a digest costs one or two registry requests.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from appliance.auth.store import Store
from appliance.errors import UsageError
from appliance.registry_api import RegistryAPI
from appliance.registry_content import (
    ManifestDeletion,
    RepositoryRow,
    TagDeletePlan,
    TagRemoval,
    TagRow,
    parse_created,
    under,
)

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
PARALLEL_READS = 8
"""Registry reads in flight at once for a first view (the registry answers ~1,000-1,600
small requests/s on 2 cores; more in flight only queues there)."""
FACTS_KEPT = 50_000
"""Digests whose facts a worker keeps (a few hundred bytes each)."""


@dataclass(frozen=True)
class ManifestFacts:
    media_type: str
    size: int
    """The manifest and everything it references (an index: its platforms' too)."""
    platforms: tuple[str, ...]
    created: str | None
    children: tuple[str, ...] = ()
    """An index's platform manifests."""


@dataclass(frozen=True)
class TagView:
    tag: str
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    size: int
    created: str | None
    pushed_at: float | None
    pushed_by: str | None
    last_pulled: float | None

    def to_json(self) -> dict:
        return {
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.media_type,
            "platforms": list(self.platforms),
            "size": self.size,
            "created": self.created,
            "pushed_at": self.pushed_at,
            "pushed_by": self.pushed_by,
            "last_pulled": self.last_pulled,
        }


class RegistryListing:
    def __init__(self, store: Store, registry: Callable[[], RegistryAPI]) -> None:
        self.store = store
        self._registry = registry
        self._facts: OrderedDict[str, ManifestFacts] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def registry(self) -> RegistryAPI:
        return self._registry()

    def repositories(self) -> list[str]:
        return sorted(self.registry.catalog())

    def tag_count(self, repository: str) -> int:
        return len(self.registry.tags(repository))

    def tag_digests(
        self,
        repository: str,
        tags: list[str] | None = None,
        pushes: dict[str, tuple] | None = None,
    ) -> dict[str, str]:
        """Where each tag points now: the newest push event, else a HEAD (those in
        parallel: a repository pushed before events were recorded)."""
        if tags is None:
            tags = self.registry.tags(repository)
        if pushes is None:
            pushes = self.store.tag_pushes(repository)
        out = {tag: pushes[tag][0] for tag in tags if tag in pushes}
        unknown = [tag for tag in tags if tag not in pushes]
        if unknown:
            with ThreadPoolExecutor(PARALLEL_READS) as pool:
                heads = pool.map(lambda tag: self.registry.digest(repository, tag), unknown)
                out.update(
                    (tag, digest) for tag, digest in zip(unknown, heads, strict=True) if digest
                )
        return out

    def _read_unknown(self, repository: str, digests: set[str]) -> None:
        """Read the digests not known yet, a few at a time: a first view of a repository
        with many new digests costs their reads once, not one after another."""
        with self._lock:
            unknown = [d for d in digests if d not in self._facts]
        if len(unknown) > 1:
            with ThreadPoolExecutor(PARALLEL_READS) as pool:
                list(pool.map(lambda digest: self.facts(repository, digest), unknown))

    def tags(self, repository: str) -> list[TagView]:
        tags = self.registry.tags(repository)
        pushes = self.store.tag_pushes(repository)
        pulls = self.store.last_pulls(repository)
        digests = self.tag_digests(repository, tags, pushes)
        self._read_unknown(repository, set(digests.values()))
        rows = []
        for tag in tags:
            pushed = pushes.get(tag)
            digest = digests.get(tag)
            if not digest:
                continue  # deleted meanwhile
            facts = self.facts(repository, digest)
            rows.append(
                TagView(
                    tag=tag,
                    digest=digest,
                    media_type=facts.media_type if facts else "",
                    platforms=facts.platforms if facts else (),
                    size=facts.size if facts else 0,
                    created=facts.created if facts else None,
                    pushed_at=pushed[1] if pushed else None,
                    pushed_by=pushed[2] if pushed else None,
                    last_pulled=pulls.get(digest),
                )
            )
        return rows

    def tag(self, repository: str, tag: str) -> TagView | None:
        """One tag, without listing the others: where it points is asked of the registry
        (a HEAD: the truth, and what a delete acts on)."""
        digest = self.registry.digest(repository, tag)
        if digest is None:
            return None
        pushed = self.store.tag_pushes(repository).get(tag)
        if pushed is not None and pushed[0] != digest:
            pushed = None  # moved without an event we kept: when and by whom is unknown
        facts = self.facts(repository, digest)
        return TagView(
            tag=tag,
            digest=digest,
            media_type=facts.media_type if facts else "",
            platforms=facts.platforms if facts else (),
            size=facts.size if facts else 0,
            created=facts.created if facts else None,
            pushed_at=pushed[1] if pushed else None,
            pushed_by=pushed[2] if pushed else None,
            last_pulled=self.store.last_pulls(repository).get(digest),
        )

    def facts(self, repository: str, digest: str) -> ManifestFacts | None:
        """What the manifest `digest` is; None when the registry no longer has it."""
        with self._lock:
            known = self._facts.get(digest)
            if known is not None:
                self._facts.move_to_end(digest)
                return known
        facts = self._read_facts(repository, digest)
        if facts is not None:
            with self._lock:
                self._facts[digest] = facts
                while len(self._facts) > FACTS_KEPT:
                    self._facts.popitem(last=False)
        return facts

    def _read_facts(self, repository: str, digest: str) -> ManifestFacts | None:
        response = self.registry.manifest(repository, digest)
        if response is None:
            return None
        document = response.json()
        media_type = str(
            document.get("mediaType") or response.headers.get("content-type", "")
        ).split(";")[0]
        own = len(response.body)
        listed = document.get("manifests")
        if media_type in INDEX_TYPES or isinstance(listed, list):
            children, platforms, size = [], [], own
            for entry in listed if isinstance(listed, list) else ():
                if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
                    continue
                children.append(entry["digest"])
                platforms.append(_platform(entry.get("platform")))
                child = self.facts(repository, entry["digest"])
                size += child.size if child else int(entry.get("size") or 0)
            return ManifestFacts(media_type, size, tuple(platforms), None, tuple(children))
        config = document.get("config") if isinstance(document.get("config"), dict) else {}
        layers = document.get("layers") if isinstance(document.get("layers"), list) else []
        size = own + int(config.get("size") or 0)
        size += sum(int(layer.get("size") or 0) for layer in layers if isinstance(layer, dict))
        platform, created = "", None
        if isinstance(config.get("digest"), str):
            body = self.registry.blob(repository, config["digest"])
            try:
                image = json.loads(body) if body else {}
            except ValueError:
                image = {}
            if isinstance(image, dict):
                platform = _platform(image)
                created = image.get("created") if isinstance(image.get("created"), str) else None
        return ManifestFacts(media_type, size, (platform,) if platform else (), created)


def _platform(value: object) -> str:
    """'linux/arm64/v8' from an index entry's platform or an image config."""
    if not isinstance(value, dict):
        return "unknown"
    parts = [str(value[key]) for key in ("os", "architecture", "variant") if value.get(key)]
    return "/".join(parts) or "unknown"


class ServiceContent:
    """The registry's content as the auth service reaches it: operations.py's
    RegistryContentSource over the registry's API (appliance-ctl's is RegistryContent,
    over storage). Listings come from RegistryListing; deletes are manifest deletes by
    digest, the only delete the API has: a tag whose manifest another tag also points at
    is refused (appliance-ctl tag delete, in storage, unlinks one tag alone), and a
    repository's name stays in the catalog, tagless."""

    def __init__(
        self,
        listing: RegistryListing,
        usage_figures: Callable[[], dict | None] = lambda: None,
    ) -> None:
        self.listing = listing
        self.usage_figures = usage_figures

    def repositories(
        self,
        path: str | None = None,
        project_of: Callable[[str], str | None] = lambda name: None,
        sizes: bool = False,
    ) -> list[RepositoryRow]:
        """The repositories under `path` with a tag count each and, with `sizes`, the
        bytes last computed (appliance-ctl usage, each GC): 0 before any computation."""
        figures = ((self.usage_figures() or {}).get("repositories") or {}) if sizes else {}
        rows = []
        for name in self.listing.repositories():
            if path is not None and not under(name, path):
                continue
            count = self.listing.tag_count(name)
            size = int((figures.get(name) or {}).get("bytes", 0)) if sizes else None
            rows.append(RepositoryRow(name, project_of(name), count, size))
        return rows

    def tags(self, name: str) -> list[TagRow]:
        return [
            TagRow(
                view.tag,
                view.digest,
                view.media_type,
                view.platforms,
                view.size,
                parse_created(view.created),
            )
            for view in self.listing.tags(name)
        ]

    def delete_tags(self, references: Iterable[tuple[str, str]]) -> TagDeletePlan:
        references = list(references)
        registry = self.listing.registry
        removals, deletions = [], []
        for name, tag in references:
            digest = registry.digest(name, tag)
            if digest is None:
                raise UsageError(f"Repository {name} has no tag {tag}.")
            others = sorted(
                other
                for other, pointed in self.listing.tag_digests(name).items()
                if pointed == digest and other != tag
            )
            if others:
                raise UsageError(
                    f"Tag {tag} points at the same manifest as {', '.join(others)}; the"
                    " registry deletes manifests with all their tags, so nothing was"
                    f" deleted. Run appliance-ctl tag delete {name}:{tag} on the host to"
                    " remove this tag alone."
                )
            facts = self.listing.facts(name, digest)
            removals.append(TagRemoval(name, tag, digest, ""))
            deletions.append(
                ManifestDeletion(
                    name, digest, bool(facts and facts.children), facts.children if facts else ()
                )
            )
        for deletion in deletions:
            registry.delete_manifest(deletion.repository, deletion.digest)
        return TagDeletePlan(tuple(removals), tuple(deletions))

    def delete_repositories(
        self, names: Iterable[str], say: Callable[[str], None], holder: str = "api"
    ) -> None:
        registry = self.listing.registry
        for name in names:
            digests = sorted(set(self.listing.tag_digests(name).values()))
            for digest in digests:
                registry.delete_manifest(name, digest)
            say(
                f"Deleted every tag of {name} ({len(digests)} manifest"
                f"{'s' if len(digests) != 1 else ''}); the name stays in the registry's"
                " catalog until appliance-ctl repo delete, the blobs until the next"
                " garbage collection."
            )
