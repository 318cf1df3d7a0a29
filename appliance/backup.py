"""Backup archives: written while the appliance serves, checked whole before a restore.

An archive is one gzip-compressed tar. Its last member, `MANIFEST.json`, names every
other member with its SHA-256, size and mode, and says what the archive holds (format
version, appliance version, storage driver, whether the images are in it). Members:

    config/appliance.yml                     the config file (restored to the -c path)
    root/<path under the appliance's root>   the secrets file, certificates, the auth database
    registry/docker/registry/v2/...          the registry's data (filesystem storage only)

Writing: under another name (mode 0600 from the start), then hard-linked to its final
name, which fails when that name exists: an archive is never overwritten.

Reading (`unpack`): one pass over the stream; each member's name and type are checked
before a byte of it is written (no absolute path, no `..`, nothing but regular files:
no link, no device), each is written under a staging directory by this module (never by
tarfile's extract), then every checksum is compared with the manifest. A truncated,
tampered or crafted archive is refused with one sentence and the caller removes the
staging directory: the host is as it was.

The registry's data is copied blobs first (outside the window), then, inside the window
a caller passes (`copy_registry_data`), the repositories' link files are read, the blobs
added since are copied, and the links are written: every link read names a blob that
existed before the link did, so every manifest in the archive finds its blobs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import sqlite3
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from appliance.errors import ApplianceError

FORMAT = 1
MANIFEST = "MANIFEST.json"
CONFIG_MEMBER = "config/appliance.yml"
ROOT_PREFIX = "root/"
REGISTRY_PREFIX = "registry/"
V2 = "docker/registry/v2"
CHUNK = 1 << 20
MANIFEST_LIMIT = 256 << 20  # a manifest of millions of blobs is still far below this
COMPRESS_LEVEL = 6  # config, secrets, certificates, the database, links, JSON blobs
# Already compressed data (gzip or zstd layers, the bulk of a registry) is stored: gzip
# at level 1 reads random-looking data at ~50 MiB/s here, stored blocks at ~950.
COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd")


class BackupError(ApplianceError):
    """A backup cannot be written, or an archive cannot be restored; nothing was changed."""


def archive_name(host: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    safe_host = "".join(c if c.isalnum() or c in ".-" else "_" for c in host) or "host"
    return f"appliance-backup-{safe_host}-{stamp}.tar.gz"


def unused_name(directory: Path, name: str) -> str:
    """`name`, or name-2, name-3, ... when an archive of that second exists already."""
    stem = name.removesuffix(".tar.gz")
    candidate, n = name, 1
    while (directory / candidate).exists():
        n += 1
        candidate = f"{stem}-{n}.tar.gz"
    return candidate


def root_member(root: Path, path: Path) -> str | None:
    """The member name of a host file (None when it lies outside the appliance's root)."""
    try:
        relative = path.absolute().relative_to(root.absolute())
    except ValueError:
        return None
    return ROOT_PREFIX + relative.as_posix()


# ---------------------------------------------------------------- writing


class _Hashing(io.RawIOBase):
    """A file read through SHA-256 (tarfile reads exactly the member's size)."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = self.source.read(size)
        self.sha256.update(data)
        return data


class GzipMembers:
    """A gzip file written as consecutive members, each compressed at its own level.

    RFC 1952 lets a gzip file hold several members; gzip -d, GNU tar -z and Python's
    gzip module read them as one stream. Switching the level between members lets the
    archive store already compressed layers (level 0) and compress the rest. Which
    bytes land in which member does not matter for correctness, only for size: the tar
    stream's own buffering may carry a few KiB across a switch.
    """

    def __init__(self, raw: BinaryIO, level: int) -> None:
        self.raw, self.level, self.pending = raw, level, 0
        self.compressor = zlib.compressobj(level, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> int:
        self.raw.write(self.compressor.compress(data))
        self.pending += len(data)
        return len(data)

    def set_level(self, level: int) -> None:
        if level == self.level:
            return
        if self.pending:  # an empty member is left out, not written
            self.raw.write(self.compressor.flush())
        self.level, self.pending = level, 0
        self.compressor = zlib.compressobj(level, zlib.DEFLATED, 31)

    def close(self) -> None:
        self.raw.write(self.compressor.flush())


@dataclass
class ArchiveWriter:
    tar: tarfile.TarFile
    gzip: GzipMembers | None = None
    members: dict[str, dict] = field(default_factory=dict)
    bytes_in: int = 0

    def _level(self, head: bytes) -> None:
        if self.gzip is not None:
            compressed = head.startswith(COMPRESSED_MAGIC)
            self.gzip.set_level(0 if compressed else COMPRESS_LEVEL)

    def _info(self, name: str, size: int, mode: int, mtime: float) -> tarfile.TarInfo:
        if name in self.members:
            raise BackupError(f"the archive would hold {name} twice; this is a bug.")
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, stat.S_IMODE(mode) & 0o777, int(mtime)
        return info

    def add_bytes(self, name: str, data: bytes, mode: int = 0o600, mtime: float = 0) -> None:
        info = self._info(name, len(data), mode, mtime or time.time())
        self._level(data[:4])
        self.tar.addfile(info, io.BytesIO(data))
        self._record(name, hashlib.sha256(data).hexdigest(), len(data), info.mode)

    def add_file(self, name: str, path: Path, mode: int | None = None) -> bool:
        """Add a regular file (False when it vanished or is not a regular file), with its
        own mode or `mode` (a snapshot stands for a file whose mode it should carry)."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return False
        with handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                return False
            info = self._info(name, st.st_size, st.st_mode if mode is None else mode, st.st_mtime)
            self._level(os.pread(handle.fileno(), 4, 0))
            hashing = _Hashing(handle)
            self.tar.addfile(info, hashing)
        self._record(name, hashing.sha256.hexdigest(), st.st_size, info.mode)
        return True

    def _record(self, name: str, sha256: str, size: int, mode: int) -> None:
        self.members[name] = {"sha256": sha256, "size": size, "mode": f"{mode:04o}"}
        self.bytes_in += size


@contextmanager
def new_archive(directory: Path, name: str) -> Iterator[ArchiveWriter]:
    """Yield a writer; on a clean exit the archive (with `writer.manifest` as its last
    member) appears under its final name, never replacing a file; otherwise no trace."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise BackupError(
            f"cannot create the backup directory {directory}: {error.strerror}; "
            f"choose another one with --to DIR."
        ) from error
    final = directory / name
    if final.exists():
        raise BackupError(f"{final} exists already; an archive is never overwritten.")
    partial = directory / f".{name}.partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise BackupError(
            f"cannot write in {directory}: {error.strerror}; choose another directory "
            f"with --to DIR."
        ) from error
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = GzipMembers(raw, COMPRESS_LEVEL)
            with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                writer = ArchiveWriter(tar, compressed)
                yield writer
                manifest = getattr(writer, "manifest", None)
                if manifest is None:
                    raise BackupError("the archive has no manifest; this is a bug.")
                manifest["members"] = writer.members
                body = json.dumps(manifest, indent=1, sort_keys=True).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode, info.mtime = len(body), 0o600, int(time.time())
                compressed.set_level(COMPRESS_LEVEL)
                tar.addfile(info, io.BytesIO(body))
            compressed.close()
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(partial, final)  # fails if the name exists: no archive is replaced
        except FileExistsError:
            raise BackupError(
                f"{final} appeared while the backup ran; an archive is never overwritten: "
                f"run the backup again."
            ) from None
    except OSError as error:
        if error.filename and Path(error.filename) != partial:
            raise BackupError(
                f"cannot read {error.filename}: {error.strerror or error}; run the backup "
                f"as root; no archive was written."
            ) from error
        raise BackupError(
            f"cannot write the archive in {directory}: {error.strerror or error}; "
            f"free some space there or choose another directory with --to DIR."
        ) from error
    finally:
        partial.unlink(missing_ok=True)


def snapshot_database(db_path: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database through its online backup API (pages
    copied while the auth service keeps writing; the copy is one point in time)."""
    try:
        source = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.Error as error:
        raise BackupError(
            f"cannot read the auth database {db_path}: {error}; check that it is readable "
            f"(run as root) and that `appliance-ctl status auth` is running."
        ) from error


@dataclass
class RegistryCopy:
    blobs_before: int = 0  # copied before the window
    blobs_inside: int = 0  # added since, copied inside it
    links: int = 0
    window_seconds: float = 0.0


def copy_registry_data(
    storage_root: Path,
    writer: ArchiveWriter,
    window: Callable[[], AbstractContextManager[object]],
) -> RegistryCopy:
    """The registry's filesystem data into the archive, blobs before repositories.

    `window()` wraps exactly what must not run beside a push: reading the repositories'
    links, the blobs added since, writing the links. The caller holds the storage lock
    (no garbage collection or deletion removes a blob meanwhile). The window makes the
    copy a snapshot of one instant; the order alone already makes it self-consistent,
    since the registry writes a blob before any link that names it.
    """
    copy = RegistryCopy()
    copied: set[str] = set()

    def copy_blobs() -> int:
        count = 0
        for directory, dirs, files in os.walk(storage_root / V2 / "blobs"):
            dirs.sort()
            for name in sorted(files):
                path = Path(directory) / name
                relative = path.relative_to(storage_root).as_posix()
                if relative in copied:
                    continue
                if writer.add_file(REGISTRY_PREFIX + relative, path):
                    copied.add(relative)
                    count += 1
        return count

    copy.blobs_before = copy_blobs()
    started = time.monotonic()
    with window():
        links: list[tuple[str, bytes, int, float]] = []
        for directory, dirs, files in os.walk(storage_root / V2 / "repositories"):
            if "_uploads" in dirs:  # pushes in progress: nothing a manifest names yet
                dirs.remove("_uploads")
            dirs.sort()
            for name in sorted(files):
                path = Path(directory) / name
                try:
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                links.append(
                    (path.relative_to(storage_root).as_posix(), data, st.st_mode, st.st_mtime)
                )
        copy.blobs_inside = copy_blobs()
        for relative, data, mode, mtime in links:
            writer.add_bytes(REGISTRY_PREFIX + relative, data, mode, mtime)
        copy.links = len(links)
    copy.window_seconds = time.monotonic() - started  # opening and closing it included
    return copy


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "host"


# ---------------------------------------------------------------- reading


@dataclass
class Unpacked:
    manifest: dict
    staging: Path

    @property
    def members(self) -> dict[str, dict]:
        return self.manifest["members"]

    def path(self, member: str) -> Path:
        return self.staging / member

    def registry_tree(self) -> Path | None:
        tree = self.staging / REGISTRY_PREFIX.rstrip("/")
        return tree if tree.is_dir() else None


def _refuse(archive: Path, why: str) -> BackupError:
    return BackupError(f"{archive} cannot be restored: {why}; nothing was changed.")


def check_member(archive: Path, info: tarfile.TarInfo) -> str:
    """The member's name, once it is one this module writes: a regular file (or a
    directory) under config/, root/ or registry/, with no way out of the staging dir."""
    name = info.name
    path = PurePosixPath(name)
    parts = name.split("/")
    if (
        not name
        or path.is_absolute()
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise _refuse(archive, f"its member {name!r} points outside the restore (absolute or ..)")
    if not (info.isfile() or info.isdir()):
        kind = "a link" if info.issym() or info.islnk() else "a device or special file"
        raise _refuse(archive, f"its member {name!r} is {kind}, which a backup never holds")
    if name != MANIFEST and parts[0] + "/" not in (ROOT_PREFIX, REGISTRY_PREFIX, "config/"):
        raise _refuse(archive, f"its member {name!r} is not part of an appliance backup")
    return name


def _copy_out(source: IO[bytes], target: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def unpack(archive: Path, staging: Path) -> Unpacked:
    """Check and write every member under `staging` (created here, removed by the caller
    on failure), then compare every checksum with the manifest."""
    found: dict[str, tuple[str, int]] = {}
    manifest_body: bytes | None = None
    staging.mkdir(mode=0o700, parents=True)
    try:
        with gzip.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                name = check_member(archive, info)
                if info.isdir():
                    continue
                if name in found or (name == MANIFEST and manifest_body is not None):
                    raise _refuse(archive, f"it holds {name} twice")
                source = tar.extractfile(info)
                assert source is not None
                if name == MANIFEST:
                    if info.size > MANIFEST_LIMIT:
                        raise _refuse(archive, "its manifest is implausibly large")
                    manifest_body = source.read()
                    continue
                if manifest_body is not None:
                    raise _refuse(archive, f"its member {name} follows the manifest")
                target = staging / name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                found[name] = _copy_out(source, target)
    except FileNotFoundError as error:
        raise BackupError(f"{archive}: no such file.") from error
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, BackupError):
            raise
        raise _refuse(
            archive, f"it is truncated or damaged ({error}); copy it again from where it was made"
        ) from error
    if manifest_body is None:
        raise _refuse(archive, f"it has no {MANIFEST} (not an appliance backup, or truncated)")
    try:
        manifest = json.loads(manifest_body)
        members = manifest["members"]
        version = manifest["format"]
    except (ValueError, KeyError, TypeError) as error:
        raise _refuse(archive, f"its {MANIFEST} is not readable") from error
    if version != FORMAT:
        raise _refuse(
            archive, f"it is of archive format {version}, and this appliance reads format {FORMAT}"
        )
    for name, (sha256, size) in sorted(found.items()):
        entry = members.get(name)
        if entry is None:
            raise _refuse(archive, f"its member {name} is not in its manifest (tampered with)")
        if entry.get("sha256") != sha256 or entry.get("size") != size:
            raise _refuse(archive, f"the checksum of {name} does not match its manifest")
    missing = sorted(set(members) - set(found))
    if missing:
        raise _refuse(archive, f"its manifest names {missing[0]}, which it does not hold")
    for name, entry in members.items():
        mode = int(str(entry.get("mode", "0600")), 8) & 0o777  # never setuid/setgid
        os.chmod(staging / name, mode)
    return Unpacked(manifest, staging)


# ---------------------------------------------------------------- the host's data


def database_contents(db_path: Path) -> list[str]:
    """What the auth database holds beyond a fresh install's admin (empty: nothing)."""
    if not db_path.exists():
        return []
    try:
        db = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            counts = {
                table: db.execute(query).fetchone()[0]
                for table, query in (
                    ("users besides root", "SELECT count(*) FROM users WHERE username != 'root'"),
                    ("projects", "SELECT count(*) FROM projects"),
                    ("personal access tokens", "SELECT count(*) FROM personal_access_tokens"),
                    ("deploy tokens", "SELECT count(*) FROM deploy_tokens"),
                )
            }
        finally:
            db.close()
    except sqlite3.Error:  # no schema yet, or unreadable: a restore replaces it either way
        return []
    return [f"{n} {what}" for what, n in counts.items() if n]


def registry_contents(storage_root: Path) -> tuple[int, int]:
    """(repositories, bytes of blobs) in filesystem storage."""
    repositories = 0
    for _, dirs, _ in os.walk(storage_root / V2 / "repositories"):
        if "_manifests" in dirs:
            repositories += 1
        dirs[:] = [d for d in dirs if not d.startswith("_")]
    size = 0
    for directory, _, files in os.walk(storage_root / V2 / "blobs"):
        for name in files:
            with contextlib.suppress(OSError):
                size += (Path(directory) / name).stat().st_size
    return repositories, size


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def temporary_database_copy(directory: Path) -> Path:
    """A private file name for the database snapshot (removed by the caller)."""
    fd, name = tempfile.mkstemp(prefix=".auth-db-backup-", dir=directory)
    os.close(fd)
    os.unlink(name)
    return Path(name)
