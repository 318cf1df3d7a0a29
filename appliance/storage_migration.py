"""Storage migration's parts that decide (`appliance-ctl storage migrate`; the run itself
is recipes/storage_migrate.py): the new storage section read and checked, the plan of
what to copy, the copy and its verification, and appliance.yml rewritten with the new
`registry.storage` and nothing else changed.

What is copied is the registry's layout under docker/registry/v2 (appliance/
registry_storage.py), uploads in progress excepted: a blob is content-addressed, so one
already on the target with the source's size is not copied again (its digest is
verified all the same); every other file (tag and revision links) is small and
mutable, so it is copied, and copied again when its content changed since. Nothing is
ever written to the source.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance import settings as settings_module
from appliance.errors import ConfigError
from appliance.registry_gc import human
from appliance.registry_storage import V2, Storage, StorageError
from appliance.resources import atomic_write
from appliance.settings import Settings

MIGRATABLE = ("filesystem", "s3")
WORKERS = 8  # parallel copies and verifications (S3 answers each request in ~ms)


# ---------------------------------------------------------------- the new section


def read_section(path: Path) -> dict:
    """FILE.yml's storage section: the mapping itself ({s3: {...}}), or the same under
    `storage:` or `registry: {storage: ...}` (a piece cut from an appliance.yml)."""
    raw = settings_module.read_config(path, must_exist=True)
    if set(raw) == {"registry"} and isinstance(raw["registry"], dict):
        raw = raw["registry"]
    if set(raw) == {"storage"}:
        raw = raw["storage"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path}: holds no storage section; write the new registry.storage there, "
            f"like `s3: {{bucket: images, region: us-east-1, accesskey: ..., secretkey: ...}}`."
        )
    return raw


def new_settings(settings: Settings, path: Path) -> tuple[dict, Settings]:
    """The section in `path` and the settings appliance.yml would give with it as its
    registry.storage, checked by the settings code (the same sentences a reconfigure
    would give); refused when the driver is one the appliance cannot copy."""
    section = read_section(path)
    config = settings_module.read_config(settings.paths.config_file, must_exist=False)
    registry = dict(config.get("registry") or {})
    registry["storage"] = section
    try:
        changed = settings_module.load(settings.paths.config_file, overrides={"registry": registry})
    except ConfigError as error:
        problems = [p for p in error.problems if p.startswith("registry.storage")] or list(
            error.problems
        )
        if len(problems) == 1:
            raise ConfigError(
                f"{path}: {problems[0]}; correct it and run this again (nothing was changed)."
            ) from None
        raise ConfigError(
            f"{path}: {len(problems)} problems in the new storage section; nothing was changed.",
            problems,
        ) from None
    drivers = [k for k in section if k not in settings_module.STORAGE_EXTRAS]
    if drivers and drivers[0] not in MIGRATABLE:
        raise ConfigError(
            f"{path}: the appliance copies to filesystem or s3 storage, not {drivers[0]}; "
            f"copy with the driver's own tools, then set registry.storage and reconfigure."
        )
    return section, changed


def driver_part(storage: dict) -> dict:
    """What names the place (the driver and its parameters), without the extras."""
    return {k: v for k, v in storage.items() if k not in settings_module.STORAGE_EXTRAS}


# ---------------------------------------------------------------- the plan (pure)


def is_copied(path: str) -> bool:
    """A file of the registry's layout that moves with it (an upload in progress does
    not: its client starts it again)."""
    return path.startswith(f"{V2}/") and "/_uploads/" not in path


def is_blob(path: str) -> bool:
    parts = path.split("/")
    return path.startswith(f"{V2}/blobs/") and parts[-1] == "data" and len(parts) >= 4


def blob_digest(path: str) -> str:
    parts = path.split("/")
    return f"{parts[-4]}:{parts[-2]}"


@dataclass(frozen=True)
class Plan:
    """What a copy does to bring the target to the source's files."""

    blobs: dict[str, int]  # path -> size, to copy
    present: dict[str, int]  # blobs the target holds already (same size): verified only
    files: dict[str, int]  # every other file of the source: copied when it changed
    extra: list[str]  # files of the target the source does not have: removed

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values()) + sum(self.files.values())

    def describe(self) -> str:
        text = (
            f"copy {len(self.blobs)} blobs ({human(sum(self.blobs.values()))}) and "
            f"{len(self.files)} repository files"
        )
        if self.present:
            text += f"; {len(self.present)} blobs already there (verified, not copied)"
        if self.extra:
            text += f"; remove {len(self.extra)} files the source does not have"
        return text


def plan(
    source: dict[str, int], target: dict[str, int], unchanged: frozenset[str] = frozenset()
) -> Plan:
    """From two listings (path -> size) of the registry's layout; `unchanged` are the
    repository files whose stamp says they were not written since they were copied."""
    blobs, present, files = {}, {}, {}
    for path, size in sorted(source.items()):
        if not is_copied(path):
            continue
        if not is_blob(path):
            if path not in unchanged or path not in target:
                files[path] = size
        elif target.get(path) == size:
            present[path] = size
        else:
            blobs[path] = size
    extra = sorted(p for p in target if is_copied(p) and p not in source)
    return Plan(blobs, present, files, extra)


def unchanged(before: dict[str, str], now: dict[str, str]) -> frozenset[str]:
    """The files whose stamp (a listing's: inode and mtime, or ETag and date) is the
    same in both listings."""
    return frozenset(path for path, stamp in now.items() if before.get(path) == stamp)


def listing(storage: Storage) -> dict[str, int]:
    return {path: size for path, size in storage.walk(V2) if is_copied(path)}


def stamped_listing(storage: Storage) -> tuple[dict[str, int], dict[str, str]]:
    """Sizes and stamps of the files that move with the registry."""
    sizes, stamps = {}, {}
    for path, size, stamp in storage.walk_stamped(V2):
        if is_copied(path):
            sizes[path], stamps[path] = size, stamp
    return sizes, stamps


def summary_of(files: dict[str, int]) -> str:
    """'12 files, 3.4 MiB, repositories team/app, root/tools' (what a non-empty target holds)."""
    repositories = sorted(
        {
            path[len(V2) + len("/repositories/") :].split("/_")[0]
            for path in files
            if path.startswith(f"{V2}/repositories/") and "/_" in path
        }
    )
    text = f"{len(files)} files, {human(sum(files.values()))}"
    if repositories:
        shown = ", ".join(repositories[:3]) + (", ..." if len(repositories) > 3 else "")
        text += f", repositories {shown}"
    return text


# ---------------------------------------------------------------- copy and verify


class ChunkStream(io.RawIOBase):
    """A readable file over a storage's chunks (what boto3 and copyfileobj read)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            piece = next(self._chunks, None)
            if piece is None:
                return 0
            self._buffer = piece
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def copy_file(source: Storage, target: Storage, path: str) -> None:
    target.write(path, io.BufferedReader(ChunkStream(source.chunks(path)), 1 << 20))


def content_digest(storage: Storage, path: str) -> str:
    digest = hashlib.sha256()
    for piece in storage.chunks(path):
        digest.update(piece)
    return f"sha256:{digest.hexdigest()}"


def parallel(work: Callable[[str], Any], paths: Iterable[str]) -> dict[str, Any]:
    paths = list(paths)
    if not paths:
        return {}
    with ThreadPoolExecutor(min(WORKERS, len(paths))) as pool:
        return dict(zip(paths, pool.map(work, paths), strict=True))


def bad_blobs(target: Storage, paths: Iterable[str]) -> list[str]:
    """The blobs whose content on the target does not hash to their name."""
    found = parallel(lambda path: content_digest(target, path), paths)
    return sorted(path for path, digest in found.items() if digest != blob_digest(path))


@dataclass
class Copy:
    """One migration's copy: what it wrote (so a second pass copies only what changed
    since) and its figures."""

    source: Storage
    target: Storage
    target_files: dict[str, int] = field(default_factory=dict)  # the target as we left it
    written: dict[str, bytes] = field(default_factory=dict)  # repository file -> content
    stamps: dict[str, str] = field(default_factory=dict)  # the source's, when planned
    blobs_copied: int = 0
    bytes_copied: int = 0
    blobs_verified: int = 0

    def apply(self, step: Plan) -> None:
        """Copy `step`'s blobs and changed files, remove its extra files, verify every
        blob it touched or found on the target (copied again once when it is wrong)."""
        for path in step.extra:
            self.target.delete(path)
            self.target_files.pop(path, None)
        parallel(lambda path: copy_file(self.source, self.target, path), step.blobs)
        self.blobs_copied += len(step.blobs)
        self.bytes_copied += sum(step.blobs.values())
        self.target_files.update(step.blobs)

        def sync(path: str) -> int:
            content = self.source.read(path)
            if self.written.get(path) != content:
                self.target.write(path, io.BytesIO(content))
                self.written[path] = content
                return len(content)
            return 0

        self.bytes_copied += sum(parallel(sync, step.files).values())
        self.target_files.update(step.files)
        checked = [*step.blobs, *step.present]
        bad = bad_blobs(self.target, checked)
        if bad:
            parallel(lambda path: copy_file(self.source, self.target, path), bad)
            bad = bad_blobs(self.target, bad)
        if bad:
            raise StorageError(
                f"{len(bad)} blobs on {self.target.description} do not match their digest "
                f"even after a second copy (first: {blob_digest(bad[0])}); check the "
                f"target storage, then run this again (nothing was switched)."
            )
        self.blobs_verified += len(checked)

    def first_step(self) -> Plan:
        """Everything the target lacks (listed now, with the source's stamps kept)."""
        source_files, self.stamps = stamped_listing(self.source)
        self.target_files = listing(self.target)
        return plan(source_files, self.target_files)

    def next_step(self) -> Plan:
        """What changed on the source since the first step (the second pass, inside the
        window): blobs the target lacks, files whose stamp changed, files gone."""
        source_files, stamps = stamped_listing(self.source)
        step = plan(source_files, self.target_files, unchanged(self.stamps, stamps))
        self.stamps = stamps
        # A blob the target holds was verified when it was copied (blobs never change).
        return Plan(step.blobs, {}, step.files, step.extra)


# ---------------------------------------------------------------- appliance.yml


def _dump(value: dict, indent: int) -> list[str]:
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=1000)
    return [" " * indent + line + "\n" for line in text.splitlines()]


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _block_end(lines: list[str], start: int, column: int) -> int:
    """The line after the last one of the block whose key is on line `start` at
    `column` (deeper-indented lines, blank lines and comments inside it)."""
    end = start + 1
    for number in range(start + 1, len(lines)):
        line = lines[number]
        if not line.strip():
            continue
        if len(line) - len(line.lstrip(" ")) <= column:
            break
        end = number + 1
    return end


def _spliced(text: str, storage: dict) -> str | None:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return "".join(lines) + "registry:\n" + "".join(_dump({"storage": storage}, 2))
    if not isinstance(root, yaml.MappingNode) or root.flow_style:
        return None
    registry = _find(root, "registry")
    if registry is None:
        return "".join(lines) + "registry:\n" + "".join(_dump({"storage": storage}, 2))
    key, value = registry
    if not isinstance(value, yaml.MappingNode) or value.flow_style or not value.value:
        return None
    found = _find(value, "storage")
    if found is not None:
        column, start = found[0].start_mark.column, found[0].start_mark.line
        end = _block_end(lines, start, column)
        return "".join(lines[:start] + _dump({"storage": storage}, column) + lines[end:])
    column = value.value[0][0].start_mark.column
    end = _block_end(lines, key.start_mark.line, key.start_mark.column)
    return "".join(lines[:end] + _dump({"storage": storage}, column) + lines[end:])


def with_storage(text: str, storage: dict) -> tuple[str, bool]:
    """appliance.yml's text with `registry.storage` replaced by `storage`, and whether
    the rest of the text (comments, order, quoting) was kept: the section's lines are
    replaced in place; a file whose shape that cannot do safely (flow style, anchors)
    is written again whole from its parsed values, which drops its comments. Either way
    the result parses to the old values with the new section."""
    old = yaml.safe_load(text) or {}
    expected = dict(old)
    expected["registry"] = {**dict(old.get("registry") or {}), "storage": storage}
    try:
        spliced = _spliced(text, storage)
    except yaml.YAMLError:
        spliced = None
    if spliced is not None:
        try:
            if yaml.safe_load(spliced) == expected:
                return spliced, True
        except yaml.YAMLError:
            pass
    return yaml.safe_dump(expected, default_flow_style=False, sort_keys=False), False


def write_config(path: Path, storage: dict) -> bool:
    """Rewrite appliance.yml with the new section, atomically, with its mode and owner;
    the result is checked by the settings code before it replaces the file. True when
    the admin's text (comments) was kept."""
    text = path.read_text() if path.exists() else ""
    new_text, kept = with_storage(text, storage)
    st = path.stat() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)

    def check(tmp: Path) -> None:
        settings_module.load(tmp, must_exist=True)

    atomic_write(path, new_text.encode(), st.st_mode & 0o7777 if st else 0o600, verify=check)
    if st is not None and os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid)
    return kept


def same_place(one: Storage, other: Storage) -> bool:
    """Two storages that are one place (other credentials or region for the same bucket,
    another spelling of the same directory): nothing to copy."""
    from appliance.registry_storage import FilesystemStorage, S3Storage

    if isinstance(one, FilesystemStorage) and isinstance(other, FilesystemStorage):
        return one.root.resolve() == other.root.resolve()
    if isinstance(one, S3Storage) and isinstance(other, S3Storage):
        return (one.bucket, one.prefix, one.client.meta.endpoint_url) == (
            other.bucket,
            other.prefix,
            other.client.meta.endpoint_url,
        )
    return False


def removal_hint(storage: Storage) -> str:
    """How the admin removes the old data once satisfied (the appliance never does)."""
    from appliance.registry_storage import FilesystemStorage, S3Storage

    if isinstance(storage, FilesystemStorage):
        return f"rm -rf {storage.root / 'docker'}"
    if isinstance(storage, S3Storage):
        prefix = f"{storage.prefix}/" if storage.prefix else ""
        return f"aws s3 rm --recursive s3://{storage.bucket}/{prefix}docker/"
    return "remove it with the storage's own tools"
