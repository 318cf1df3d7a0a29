"""`appliance-ctl registry-garbage-collect`: the run that reclaims the registry's storage.

Three resources, through the one run pipeline (its lock, its log under
`<log_dir>/gc/`, secrets masked, every service checked at the end):

1. with `--delete-untagged`, the untagged manifests (no tag reaches them; the children
   of a tagged index are reached), deleted through the registry's API while it is still
   read-write (a read-only registry refuses deletes);
2. the garbage collection: its plan is what Distribution's collector will delete (blobs
   no manifest revision references, from a snapshot of the storage). Applying it opens
   the maintenance window (the marker, then a handover to read-only processes: pulls go
   on, the token service refuses pushes with a sentence), runs the plain collector as
   the registry's account and closes the window in a `finally` (a handover back);
3. the stats file `<data_dir>/registry-gc.json` (what every run freed), which the token
   service's /metrics reads, and the usage figures computed again (quotas, metrics).

`--dry-run` is the pipeline's: every plan is printed, nothing is applied, so no window
is opened and the storage stays byte-identical. A plan with nothing to free opens no
window either: pushes are refused only when there is something to collect.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from appliance import registry_gc, registry_maintenance, registry_storage
from appliance.auth.cluster import SharedWindow
from appliance.engine import Report
from appliance.errors import ApplianceError, ServiceError
from appliance.pipeline import Run, crash_point, hold_point, reload_service
from appliance.resources import Change, Resource
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import registry
from recipes.base import service_user

REASON = "garbage collection"


@dataclass
class Collection:
    """What the run's resources share: one storage snapshot, the plan, the results."""

    settings: Settings
    secrets: Secrets
    delete_untagged: bool
    verbose: bool
    started: float = field(default_factory=time.time)
    _storage: registry_storage.Storage | None = None
    content: registry_storage.Content | None = None
    untagged: dict[str, list[str]] = field(default_factory=dict)
    deleted: int = 0
    garbage: dict[str, int] = field(default_factory=dict)
    expected_end: float = 0.0
    freed: dict[str, int] | None = None  # None: the collector did not run
    window_seconds: float = 0.0
    registry_was_running: bool = True
    shared: SharedWindow | None = None  # the window as the other nodes see it
    collector: registry_gc.CollectorResult | None = None
    redact: Callable[[str], str] = field(default=lambda line: line, repr=False)
    garbage_manifests: dict | None = None

    @property
    def storage(self) -> registry_storage.Storage:
        if self._storage is None:
            self._storage = registry_storage.open_storage(registry.storage(self.settings))
        return self._storage

    def per_repository(self, blobs: dict[str, int]) -> list[str]:
        """'team/app: 3 blobs, 1.2 MiB' per repository (what --verbose prints)."""
        content = self.snapshot()
        if self.garbage_manifests is None:  # read before the collector deletes them
            self.garbage_manifests = registry_gc.unlinked_manifests(
                self.storage, content, self.garbage
            )
        manifests = self.garbage_manifests
        return [
            f"{name or '(no repository)'}: {len(mine)} blobs, "
            f"{registry_gc.human(sum(mine.values()))}"
            for name, mine in registry_gc.by_repository(content, blobs, manifests).items()
        ]

    def snapshot(self) -> registry_storage.Content:
        """Read once per run: the plan of every resource comes from the same snapshot."""
        if self.content is None:
            self.content = registry_storage.read_content(self.storage)
            if self.delete_untagged:
                self.untagged = registry_storage.untagged(self.content)
        return self.content


@dataclass
class UntaggedManifests(Resource):
    collection: Collection
    kind: ClassVar[str] = "untagged manifests in"

    @property
    def name(self) -> str:
        return self.collection.storage.description

    def current(self) -> dict[str, list[str]]:
        self.collection.snapshot()
        return self.collection.untagged

    def plan(self, current: dict[str, list[str]]) -> list[Change]:
        return [
            Change(
                f"delete {len(digests)} in {name}",
                "\n".join(f"{name}@{digest}" for digest in digests),
            )
            for name, digests in current.items()
        ]

    def apply(self) -> None:
        import recipes

        c = self.collection
        api = recipes.registry_api(c.settings, c.secrets)
        for name, digests in c.untagged.items():
            for digest in digests:
                c.deleted += api.delete_manifest(name, digest)


@dataclass
class GarbageCollection(Resource):
    collection: Collection
    kind: ClassVar[str] = "garbage collection of"

    @property
    def name(self) -> str:
        return self.collection.storage.description

    def current(self) -> dict[str, int]:
        c = self.collection
        content = c.snapshot()
        c.garbage = registry_gc.unreferenced(content, c.untagged)
        previous = registry_gc.read_stats(c.settings.paths.registry_gc_file).get("last") or {}
        objects = len(content.blobs) + sum(len(r.revisions) for r in content.repositories.values())
        c.expected_end = time.time() + registry_gc.expected_seconds(
            objects,
            remote="filesystem" not in registry.storage(c.settings),
            previous_window=previous.get("window_seconds"),
        )
        return c.garbage

    def plan(self, current: dict[str, int]) -> list[Change]:
        if not current:
            return []
        until = time.strftime("%H:%M", time.gmtime(-(-self.collection.expected_end // 60) * 60))
        detail = ""
        if self.collection.verbose:
            detail = "\n".join(self.collection.per_repository(current))
        return [
            Change(
                f"{len(current)} unreferenced blobs, {registry_gc.human(sum(current.values()))}; "
                f"pushes refused until about {until} UTC",
                detail,
            )
        ]

    def apply(self) -> None:
        c = self.collection
        paths = c.settings.paths
        window = registry_maintenance.Window(
            reason=REASON,
            started=time.time(),
            expected_end=c.expected_end,
            pid=os.getpid(),
            pid_start=registry_maintenance.process_start(os.getpid()),
        )
        opened = time.monotonic()
        c.shared = open_window(c.settings, window)
        failed: BaseException | None = None
        try:
            c.registry_was_running = self.hand_over()
            watch = self.watch()
            why = watch()
            if why:
                raise ServiceError(f"{why}; nothing was collected")
            crash_point("gc-window")
            hold_point("gc-window")
            before = registry_gc.read_blobs(c.storage)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            c.collector = registry_gc.run_collector(
                [c.settings.facts.registry_binary, "garbage-collect", str(paths.registry_config)],
                {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    **registry.environment(c.settings),
                },
                service_user(c.settings, c.settings.registry.username),
                paths.log_dir / "gc" / f"{stamp}.garbage-collect.out",
                c.redact,
                watch,
            )
            after = registry_gc.read_blobs(c.storage)
            c.freed = {digest: size for digest, size in before.items() if digest not in after}
        except BaseException as error:
            failed = error
            raise
        finally:
            try:
                self.close(window)
            except ApplianceError as error:
                if failed is None:
                    raise
                raise ServiceError(
                    f"{failed} The maintenance window could not be closed either: {error}; "
                    f"appliance-ctl reconfigure closes it."
                ) from failed
            finally:
                c.window_seconds = time.monotonic() - opened

    def hand_over(self) -> bool:
        return hand_over(self.collection.settings)

    def watch(self) -> Callable[[], str | None]:
        return watch(self.collection.settings)

    def close(self, window: registry_maintenance.Window) -> None:
        c = self.collection
        close(c.settings, window, c.registry_was_running, c.shared)


def hand_over(settings: Settings) -> bool:
    """HUP the registry's wrapper and wait until it serves on the files as the marker
    says (read-only while it is open); False when the registry is not running (a
    start meanwhile reads the marker and comes up read-only)."""
    from appliance.services import Supervisor

    paths = settings.paths
    supervisor = Supervisor(paths.supervisor_config, paths.supervisor_socket)
    if not supervisor.is_running():
        return False
    return reload_service(supervisor, registry.service(settings))


def watch(settings: Settings) -> Callable[[], str | None]:
    """Why nothing may run inside the window (or go on): a registry process that is not
    read-only (a wrapper of an older version, or one that lost the window)."""

    def why() -> str | None:
        state = registry.handover_state(settings)
        live = [pid for pid in (state.get("children") or {}).values() if _alive(pid)]
        if not live or state.get("readonly") is True:
            return None
        if "readonly" not in state:
            return (
                "the registry's wrapper runs an older version of the appliance, which "
                "cannot serve read-only; run appliance-ctl restart --cold registry "
                "(a short interruption), then this again"
            )
        return (
            "a registry process that is not read-only is serving (see appliance-ctl tail registry)"
        )

    return why


def open_window(settings: Settings, window: registry_maintenance.Window) -> SharedWindow:
    """The window in force: published to the other nodes first (with auth.database_url;
    another node's window in force refuses this one, nothing written), then the marker."""
    shared = SharedWindow(settings.auth_database if settings.auth.enable else Path())
    shared.open(window)
    try:
        registry_maintenance.write(settings.paths.registry_maintenance, window)
    except BaseException:
        shared.close()
        raise
    return shared


def close(
    settings: Settings,
    window: registry_maintenance.Window,
    was_running: bool,
    shared: SharedWindow | None = None,
) -> None:
    """Back to read-write: the token service keeps refusing pushes (`closing`) until
    the read-write registry serves, then the marker (and the shared window) goes."""
    path = settings.paths.registry_maintenance
    registry_maintenance.write(path, replace(window, phase=registry_maintenance.CLOSING))
    try:
        if shared is not None:
            shared.closing(window)
        state = registry.handover_state(settings)
        if was_running or state.get("readonly"):
            hand_over(settings)
    finally:
        try:
            registry_maintenance.remove(path)
        finally:
            if shared is not None:
                shared.close()


@contextmanager
def read_only_window(settings: Settings, reason: str, expected_seconds: float) -> Iterator[None]:
    """The garbage collection's window for another run (a backup's copy of the
    repositories): the marker, the registry handed over to read-only processes (pulls go
    on; the token service refuses pushes and deletes with a sentence naming `reason`),
    the block, then back to read-write, whatever the block raised. A registry process
    that is not read-only stops it before the block runs (ServiceError)."""
    now = time.time()
    window = registry_maintenance.Window(
        reason=reason,
        started=now,
        expected_end=now + expected_seconds,
        pid=os.getpid(),
        pid_start=registry_maintenance.process_start(os.getpid()),
    )
    shared = open_window(settings, window)
    was_running = False
    failed: BaseException | None = None
    try:
        was_running = hand_over(settings)
        why = watch(settings)()
        if why:
            raise ServiceError(f"{why}; nothing was done in the window")
        yield
    except BaseException as error:
        failed = error
        raise
    finally:
        try:
            close(settings, window, was_running, shared)
        except ApplianceError as error:
            if failed is None:
                raise
            raise ServiceError(
                f"{failed} The maintenance window could not be closed either: {error}; "
                f"appliance-ctl reconfigure closes it."
            ) from failed


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError):
        return False
    return True


@dataclass
class GcStats(Resource):
    """`<data_dir>/registry-gc.json`, one more run in it."""

    collection: Collection
    kind: ClassVar[str] = "file"

    @property
    def name(self) -> str:
        return str(self.collection.settings.paths.registry_gc_file)

    def current(self) -> dict:
        return registry_gc.read_stats(self.collection.settings.paths.registry_gc_file)

    def plan(self, current: dict) -> list[Change]:
        self.stats = registry_gc.next_stats(current, self.last())
        return [Change(f"run {self.stats['runs']}")]

    def last(self) -> dict:
        c = self.collection
        freed = c.freed or {}
        return {
            "started": int(c.started),
            "finished": int(time.time()),
            "dry_run": False,
            "freed_bytes": sum(freed.values()),
            "freed_blobs": len(freed),
            "window_seconds": round(c.window_seconds, 3),
        }

    def apply(self) -> None:
        registry_gc.write_stats(self.collection.settings.paths.registry_gc_file, self.stats)


@dataclass
class UsageFigures(Resource):
    """The usage figures (`appliance-ctl usage`, quotas, /metrics) computed again from
    storage once a collection freed something: what a quota holds a project to must not
    count blobs that are gone."""

    collection: Collection
    kind: ClassVar[str] = "usage figures"

    @property
    def name(self) -> str:
        return str(self.collection.settings.paths.registry_usage_file)

    def current(self) -> bool:
        return self.collection.freed is not None or self.collection.deleted > 0

    def plan(self, current: bool) -> list[Change]:
        return [Change("computed again after the collection")] if current else []

    def apply(self) -> None:
        from appliance import usage

        usage.refresh(self.collection.settings, self.collection.storage)


def run(
    settings: Settings, dry_run: bool = False, delete_untagged: bool = False, verbose: bool = False
) -> Run:
    """The garbage collection run (built here, executed by appliance.pipeline)."""
    import recipes
    from appliance import secrets as secrets_module
    from appliance.reconfigure import redactor

    state: dict[str, Collection] = {}

    def resources(secrets: Secrets) -> Iterator[Resource]:
        collection = state["collection"] = Collection(
            settings, secrets, delete_untagged, verbose, redact=redactor(settings, secrets)
        )
        if delete_untagged:
            yield UntaggedManifests(collection)
        yield GarbageCollection(collection)
        if not dry_run:
            yield GcStats(collection)
            yield UsageFigures(collection)

    def summary(report: Report, elapsed: float) -> str:
        c = state.get("collection")
        name = "registry-garbage-collect"
        if c is None or report.failed:
            return f"{name}: failed after {elapsed:.1f} s"
        planned = f"{len(c.garbage)} blobs, {registry_gc.human(sum(c.garbage.values()))}"
        if dry_run:
            untagged = sum(len(d) for d in c.untagged.values())
            extra = f" and {untagged} untagged manifests" if delete_untagged else ""
            return f"{name} (dry run): would free {planned}{extra}; nothing was changed"
        if c.freed is None:
            return f"{name}: nothing to free; the registry stayed read-write ({elapsed:.1f} s)"
        return (
            f"{name}: freed {len(c.freed)} blobs, {registry_gc.human(sum(c.freed.values()))} "
            f"in {elapsed:.1f} s; pushes were refused for {c.window_seconds:.1f} s "
            f"(read-only window)"
        )

    def messages(report: Report) -> Iterator[str]:
        c = state.get("collection")
        if c is None or c.freed is None or c.content is None:
            return
        if c.deleted:
            yield f"  {c.deleted} untagged manifests deleted before the collection"
        if not verbose:
            return
        for line in c.per_repository(c.freed):
            yield f"  {line}"
        if c.collector is not None:
            import resource

            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            yield (
                f"  docker-registry garbage-collect: {c.collector.seconds:.2f} s, peak memory "
                f"{registry_gc.human(c.collector.peak_rss_bytes)} (appliance-ctl: "
                f"{registry_gc.human(own)}); its output: {c.collector.output}"
            )

    return Run(
        name="registry-garbage-collect",
        log_name="gc",
        resources=resources,
        services=recipes.services(settings),
        secrets=lambda: secrets_module.for_settings(settings),
        preflight=lambda: preflight(settings),
        summary=summary,
        messages=messages,
        start_services=False,
        check_every_service=not dry_run,
        not_running_note="it reads the storage as it is when it starts",
    )


def preflight(settings: Settings) -> None:
    if not settings.registry.enable:
        raise ServiceError(
            "the bundled registry is disabled (registry.enable: false); collect garbage "
            "where the registry runs."
        )
