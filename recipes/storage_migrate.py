"""`appliance-ctl storage migrate --to FILE.yml`: the registry's data moved to another
storage while it serves, through the one run pipeline (its lock, its log under
`<log_dir>/storage-migrate/`, secrets masked, every service checked at the end).

Two resources:

1. the copy: every blob and repository file of the current storage copied to the new
   one while the registry serves read-write (pushes meanwhile land in the old storage
   and are copied in step 2), every blob's digest verified on the target;
2. `registry.storage` in appliance.yml: inside the garbage collection's read-only window
   (`recipes.registry_gc.read_only_window`: pulls go on, the token service refuses
   pushes and deletes with the maintenance sentence) what changed since step 1 is
   copied and verified, appliance.yml gets the new section, the registry's config
   files are written for it, and closing the window hands the registry over to
   read-write processes serving from the new storage. A failure before appliance.yml
   is written leaves everything as it was (the registry back read-write on the old
   storage).

The old storage is never written to: it stays until the admin removes it (the run says
where and how). The CLI holds the storage lock (no garbage collection, backup or
deletion meanwhile) and runs a reconfigure with the new settings afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from appliance import registry_storage
from appliance import storage_migration as migration
from appliance.engine import Report
from appliance.errors import ApplianceError, ServiceError
from appliance.pipeline import Run, crash_point, hold_point
from appliance.resources import Change, Resource
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import registry

REASON = "storage migration"
WINDOW_EXPECTED_SECONDS = 60  # the clients' "until about HH:MM UTC" (rounded up)


@dataclass
class Migration:
    """What the run's resources share: both storages, the plan, the figures."""

    settings: Settings
    new_settings: Settings
    section: dict
    source: registry_storage.Storage
    target: registry_storage.Storage
    started: float = field(default_factory=time.monotonic)
    first: migration.Plan | None = None
    copy: migration.Copy | None = None
    second: migration.Plan | None = None
    copy_seconds: float = 0.0  # copying and verifying, both passes
    sync_seconds: float = 0.0  # the second pass, inside the window
    window_seconds: float = 0.0
    kept_comments: bool = True
    switched: bool = False

    def plan(self) -> migration.Plan:
        if self.first is None:
            self.copy = migration.Copy(self.source, self.target)
            self.first = self.copy.first_step()
        return self.first


def open_storages(settings: Settings, new: Settings) -> tuple:
    from recipes.base import service_user

    source = registry_storage.open_storage(registry.storage(settings))
    target = registry_storage.open_storage(registry.storage(new))
    user = service_user(new, new.registry.username)
    if isinstance(target, registry_storage.FilesystemStorage) and user:
        import pwd

        entry = pwd.getpwnam(user)
        target.owner = (entry.pw_uid, entry.pw_gid)
    return source, target


@dataclass
class DataCopy(Resource):
    migration: Migration
    kind: ClassVar[str] = "registry data copy to"

    @property
    def name(self) -> str:
        return self.migration.target.description

    def current(self) -> migration.Plan:
        return self.migration.plan()

    def plan(self, current: migration.Plan) -> list[Change]:
        return [Change(f"{current.describe()} from {self.migration.source.description}")]

    def apply(self) -> None:

        m = self.migration
        assert m.copy is not None and m.first is not None
        started = time.monotonic()
        m.copy.apply(m.first)
        m.copy_seconds = time.monotonic() - started
        crash_point("migrate-copied")
        hold_point("migrate-copied")


@dataclass
class StorageSwitch(Resource):
    migration: Migration
    secrets: Secrets
    kind: ClassVar[str] = "registry.storage in"

    @property
    def name(self) -> str:
        return str(self.migration.settings.paths.config_file)

    def current(self) -> str:
        return self.migration.source.description

    def plan(self, current: str) -> list[Change]:
        return [
            Change(
                f"{current} -> {self.migration.target.description}, after the last changes "
                f"are copied inside a read-only window (pulls go on, pushes wait)"
            )
        ]

    def apply(self) -> None:
        from recipes import registry_gc

        m = self.migration
        assert m.copy is not None
        opened = time.monotonic()
        try:
            with registry_gc.read_only_window(m.settings, REASON, WINDOW_EXPECTED_SECONDS):
                hold_point("migrate-window")
                synced = time.monotonic()
                m.second = m.copy.next_step()
                m.copy.apply(m.second)
                m.sync_seconds = time.monotonic() - synced
                m.copy_seconds += m.sync_seconds
                crash_point("migrate-window")
                m.kept_comments = migration.write_config(m.settings.paths.config_file, m.section)
                m.switched = True
                # The registry's files for the new storage: closing the window hands the
                # registry over to processes started on them.
                for resource in self.registry_files():
                    if resource.plan(resource.current()):
                        resource.apply()
        except ApplianceError as error:
            if m.switched:
                raise ServiceError(
                    f"{error} appliance.yml already names the new storage "
                    f"({m.target.description}); run appliance-ctl reconfigure."
                ) from error
            raise
        finally:
            m.window_seconds = time.monotonic() - opened

    def registry_files(self) -> Iterator[Resource]:
        new = self.migration.new_settings
        wanted = {
            new.paths.registry_config,
            registry.readonly_config(new),
            registry.program_file(new),
        }
        root = registry.filesystem_root(new)
        if root is not None:
            wanted.add(root)
        for resource in registry.resources(new, self.secrets):
            if getattr(resource, "path", None) in wanted:
                yield resource


def run(settings: Settings, target_file: Path, dry_run: bool = False, force: bool = False) -> Run:
    """The migration run (built here, executed by appliance.pipeline); raises a
    ConfigError naming FILE.yml when its section is not one the registry can use."""
    import recipes
    from appliance import secrets as secrets_module

    section, new = migration.new_settings(settings, target_file)
    state: dict[str, Migration] = {}

    def preflight() -> None:
        if not settings.registry.enable:
            raise ServiceError(
                "the bundled registry is disabled (registry.enable: false); migrate the "
                "storage where the registry runs."
            )
        if not settings.paths.secrets_file.exists():
            raise ServiceError(
                f"{settings.paths.secrets_file} does not exist: run appliance-ctl "
                f"reconfigure first."
            )
        old, wanted = registry.storage(settings), registry.storage(new)
        if migration.driver_part(old) == migration.driver_part(wanted):
            raise ServiceError(
                f"{target_file} names the storage the registry already uses; nothing to migrate."
            )
        source, target = open_storages(settings, new)
        if migration.same_place(source, target):
            raise ServiceError(
                f"{target_file} names {target.description}, where the registry's data "
                f"already is; to change only how it is reached (credentials, region), edit "
                f"registry.storage in {settings.paths.config_file} and reconfigure."
            )
        target.check()
        found = migration.listing(target)
        if found and not force:
            raise ServiceError(
                f"{target.description} is not empty ({migration.summary_of(found)}); "
                f"migrate to an empty place, or add --force to make it a copy of the "
                f"current storage (files the current storage does not have are removed); "
                f"nothing was changed."
            )
        state["migration"] = Migration(settings, new, section, source, target)

    def resources(secrets: Secrets) -> Iterator[Resource]:
        m = state["migration"]
        yield DataCopy(m)
        yield StorageSwitch(m, secrets)

    def summary(report: Report, elapsed: float) -> str:
        m = state.get("migration")
        name = "storage-migrate"
        if m is None or m.first is None:
            return f"{name}: failed after {elapsed:.1f} s"
        if dry_run:
            return (
                f"{name} (dry run) to {m.target.description}: would {m.first.describe()}; "
                f"nothing was changed"
            )
        if report.failed or m.copy is None:
            where = "appliance.yml names the new storage" if m.switched else "nothing switched"
            return f"{name}: failed after {elapsed:.1f} s; {where}"
        mib = m.copy.bytes_copied / 2**20
        rate = mib / m.copy_seconds if m.copy_seconds > 0 else 0.0
        second = m.second or migration.Plan({}, {}, {}, [])
        return (
            f"{name}: {m.copy.blobs_copied} blobs, {migration.human(m.copy.bytes_copied)} "
            f"copied to {m.target.description} in {elapsed:.1f} s ({rate:.1f} MiB/s), "
            f"{m.copy.blobs_verified} blob digests verified; read-only window "
            f"{m.window_seconds:.2f} s (pulls went on, pushes were refused; "
            f"{len(second.blobs)} blobs, {len(second.files)} repository files and "
            f"{len(second.extra)} removals synced in it in {m.sync_seconds:.2f} s)"
        )

    def messages(report: Report) -> Iterator[str]:
        m = state.get("migration")
        if m is None or dry_run or not m.switched:
            return
        yield f"  registry.storage in {settings.paths.config_file} now names {m.target.description}"
        if not m.kept_comments:
            yield (
                "  (appliance.yml was written again whole from its values: its comments are gone)"
            )
        yield (
            f"  the old data stays in {m.source.description}; nothing reads it any more. "
            f"Once the registry serves as it should, remove it: "
            f"{migration.removal_hint(m.source)}"
        )

    return Run(
        name="storage-migrate",
        log_name="storage-migrate",
        resources=resources,
        services=recipes.services(settings),
        secrets=lambda: secrets_module.for_settings(settings),
        preflight=preflight,
        summary=summary,
        messages=messages,
        start_services=False,
        check_every_service=not dry_run,
        not_running_note="it reads the new storage when it starts",
    )
