"""`appliance-ctl backup` and `appliance-ctl restore`: what goes into an archive, and how
a host is put back from one (the archive format itself is appliance/backup.py).

The backup only reads: the config, the secrets file and the certificates under the
reconfigure lock (no run rewrites them meanwhile), the auth database through SQLite's
online backup API while the service writes, and the registry's filesystem data under
the storage lock (no garbage collection or deletion meanwhile), the repositories inside
`registry_window`. Its output is kept as a run log under `<log_dir>/backup/`.

The restore checks the whole archive into a staging directory first; only then does it
stop the appliance, move the files into place under the reconfigure lock, hand the
auth database and the registry's data to the services' accounts, and run the one
pipeline's reconfigure (`recipes.reconfigure`), which writes every derived file again
(the registry's bundle and the auth key from the restored secrets file) and starts the
services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from appliance import backup as archive_format
from appliance import settings as settings_module
from appliance.auth.database_files import SUFFIXES, chown_database_files
from appliance.backup import BackupError
from appliance.engine import Redactor
from appliance.reconfigure import RunLog, reconfigure_lock
from appliance.registry_storage import storage_lock
from appliance.secrets import read as read_secrets
from appliance.settings import Settings, is_sensitive, sensitive_values
from recipes import registry

S3_NOTE = (
    "the images are not in this archive: they stay in {where}; protect them with the "
    "bucket's own versioning or replication"
)


WINDOW_REASON = "backup"
WINDOW_EXPECTED_SECONDS = 30  # the clients' "until about HH:MM UTC" (rounded up)


def registry_window(
    settings: Settings, out: Callable[[str], None]
) -> Callable[[], AbstractContextManager[object]]:
    """The window the repositories are copied in (blobs are copied before it): the
    garbage collection's read-only window (recipes/registry_gc.read_only_window), held
    with the reconfigure lock so no run hands the registry over meanwhile. Pulls go on;
    pushes and deletes are refused with "registry is in maintenance (backup) until about
    ..." for its length, so the images are one instant's snapshot. (Without it the copy
    would still be self-consistent: a link is read only after the blobs it names were
    written.)"""
    from recipes import registry_gc

    @contextlib.contextmanager
    def window() -> Iterator[None]:
        with (
            reconfigure_lock(settings.paths.lock_file, out),
            registry_gc.read_only_window(settings, WINDOW_REASON, WINDOW_EXPECTED_SECONDS),
        ):
            yield

    return window


def _redactor(settings: Settings) -> Redactor:
    secrets = read_secrets(settings.paths.secrets_file)
    return Redactor([*sensitive_values(settings), *secrets.values()], is_sensitive)


def _host_files(settings: Settings) -> list[Path]:
    """The secrets file, every file under the ssl directory, the certificate and key
    files named in appliance.yml, the initial root password file if it is still there."""
    p = settings.paths
    files = [p.secrets_file]
    if p.ssl_dir.is_dir():
        files += sorted(path for path in p.ssl_dir.rglob("*") if path.is_file())
    rn = settings.registry_nginx
    for name in (rn.ssl_certificate, rn.ssl_certificate_key):
        if name and Path(name).is_file() and Path(name) not in files:
            files.append(Path(name))
    if p.initial_root_password_file.is_file():
        files.append(p.initial_root_password_file)
    return files


def backup(
    settings: Settings,
    directory: Path | None = None,
    skip_images: bool = False,
    stream: TextIO = sys.stdout,
) -> Path:
    """Write one archive; print (and log) what it holds, its path and its size."""
    p = settings.paths
    if not p.secrets_file.exists():
        raise BackupError(
            f"{p.secrets_file} does not exist: this host was never reconfigured, so there "
            f"is nothing to back up."
        )
    if not os.access(p.secrets_file, os.R_OK):
        raise BackupError(f"cannot read {p.secrets_file}: run the backup as root.")
    out = RunLog(stream, p.log_dir / "backup")
    out.redact = _redactor(settings)
    started = time.monotonic()
    target_dir = directory or p.data_dir / "backups"
    name = archive_format.unused_name(
        target_dir, archive_format.archive_name(archive_format.host_name())
    )
    storage = registry.storage(settings) if settings.registry.enable else {}
    driver = next((k for k in storage if k not in ("delete", "cache", "redirect")), "none")
    filesystem = registry.filesystem_root(settings) if settings.registry.enable else None
    if skip_images:
        images, note = "skipped", "the images are not in this archive (--skip-images)"
    elif not settings.registry.enable:
        images, note = "none", "no registry runs here (registry.enable: false)"
    elif filesystem is None:
        where = f"{driver} storage"
        if driver == "s3":
            where = f"s3 bucket {storage['s3'].get('bucket')}"
        images, note = "not included", S3_NOTE.format(where=where)
    else:
        images, note = "included", f"the registry's data from {filesystem}"
    try:
        with archive_format.new_archive(target_dir, name) as writer:
            with reconfigure_lock(p.lock_file, out):
                writer.add_file(archive_format.CONFIG_MEMBER, p.config_file) or writer.add_bytes(
                    archive_format.CONFIG_MEMBER, b"{}\n", 0o644
                )
                skipped = []
                for path in _host_files(settings):
                    member = archive_format.root_member(p.root, path)
                    if member is None:
                        skipped.append(str(path))
                    else:
                        writer.add_file(member, path)
            out(
                f"backup: appliance.yml, the secrets file, "
                f"{sum(1 for m in writer.members if m.startswith('root/') and '/ssl/' in m)} "
                f"files of {p.ssl_dir}"
            )
            for path in skipped:
                out(f"backup: not in the archive (outside the root {p.root}): {path}")
            database_member = None
            if settings.auth.enable and settings.auth.database_url:
                out(
                    f"backup: not in the archive: the auth database on PostgreSQL"
                    f" ({settings.auth.database_url}); back it up with pg_dump"
                )
            elif settings.auth.enable and Path(settings.auth.database_path).exists():
                database_member = archive_format.root_member(
                    p.root, Path(settings.auth.database_path)
                )
                with tempfile.TemporaryDirectory(dir=p.data_dir, prefix=".backup-") as tmp:
                    copy = Path(tmp) / "auth.db"
                    archive_format.snapshot_database(Path(settings.auth.database_path), copy)
                    writer.add_file(
                        database_member or "root/auth.db",
                        copy,
                        mode=Path(settings.auth.database_path)
                        .stat()
                        .st_mode,  # 0600: password hashes
                    )
                database = Path(settings.auth.database_path)
                out(f"backup: the auth database {database} (SQLite online backup)")
            registry_copy = None
            if images == "included" and filesystem is not None:
                with storage_lock(p.registry_storage_lock, "backup"):
                    registry_copy = archive_format.copy_registry_data(
                        filesystem, writer, registry_window(settings, out)
                    )
                out(
                    f"backup: registry data: {registry_copy.blobs_before} blobs, then inside "
                    f"a read-only window of {registry_copy.window_seconds:.2f} s (pulls went "
                    f"on, pushes were refused) {registry_copy.blobs_inside} blobs added since "
                    f"and {registry_copy.links} repository links"
                )
            else:
                out(f"backup: {note}")
            writer.manifest = {  # type: ignore[attr-defined]
                "format": archive_format.FORMAT,
                "appliance_version": _version(),
                "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "host": archive_format.host_name(),
                "root": str(p.root),
                "storage": {"driver": driver, "images": images, "note": note},
                "auth_database": database_member,
                "holds": [
                    "appliance.yml",
                    "secrets file",
                    "certificates",
                    *(["auth database"] if database_member else []),
                    *(["registry data"] if registry_copy else []),
                ],
            }
        final = target_dir / name
        size = final.stat().st_size
        out(
            f"backup: {final} ({archive_format.human_size(size)}, "
            f"{archive_format.human_size(writer.bytes_in)} before compression) in "
            f"{time.monotonic() - started:.2f} s"
        )
        if images != "included":
            out(f"backup: {note}.")
        return final
    except BackupError as error:
        out.note(f"backup: failed: {error}")
        raise
    finally:
        out.save()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("appliance")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- restore


def host_data(settings: Settings) -> dict[str, str]:
    """What a restore would replace that a fresh install does not have ("auth",
    "registry" -> what it holds): users besides root, projects or tokens in the auth
    database, repositories in the registry's filesystem storage. (A fresh install's own
    config, secrets and certificates are replaced too, and said so, but are no data.)"""
    found = {}
    if settings.auth.enable:
        contents = archive_format.database_contents(Path(settings.auth.database_path))
        if contents:
            found["auth"] = (
                f"the auth database {Path(settings.auth.database_path)} ({', '.join(contents)})"
            )
    root = registry.filesystem_root(settings) if settings.registry.enable else None
    if root is not None:
        repositories, size = archive_format.registry_contents(root)
        if repositories or size:
            found["registry"] = (
                f"the registry's data in {root} ({repositories} repositories, "
                f"{archive_format.human_size(size)})"
            )
    return found


def _owner_of(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid


def hand_over(settings: Settings) -> None:
    """The auth database to the auth directory's owner and the registry's data to its
    storage directory's owner: the accounts reconfigure gives those directories (a
    reconfigure chowns a database it creates or migrates, never one already current,
    and the storage directory but not what is under it)."""
    if os.geteuid() != 0:
        return
    db = Path(settings.auth.database_path)
    owner = _owner_of(db.parent)
    if settings.auth.enable and owner and db.exists():
        chown_database_files(db, *owner)
    root = registry.filesystem_root(settings) if settings.registry.enable else None
    owner = _owner_of(root) if root else None
    if root is not None and owner is not None:
        for directory, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                os.lchown(Path(directory) / name, *owner)


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:  # another file system: copy, then rename beside the target
        partial = target.with_name(f".{target.name}.restore")
        shutil.copy2(source, partial)
        os.replace(partial, target)


def restore(
    settings: Settings,
    archive: Path,
    force: bool = False,
    stream: TextIO = sys.stdout,
    stop_services: Callable[[Callable[[str], None]], None] | None = None,
) -> Settings:
    """Put the archive's files in place of this host's and return the restored settings
    (the caller runs the reconfigure). Refused, with nothing changed, when the host has
    data and `force` is not given, or when the archive is not whole."""
    p = settings.paths
    found = host_data(settings)
    if found and not force:
        raise BackupError(
            f"this host has data a restore would replace: {'; '.join(found.values())}. "
            f"Restore onto a fresh install, or add --force to replace it; nothing was changed."
        )
    if not archive.is_file():
        raise BackupError(f"{archive}: no such file.")
    out = RunLog(stream, p.log_dir / "restore")
    p.data_dir.mkdir(parents=True, exist_ok=True)
    staging = p.data_dir / ".restore-staging"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed restore left
    try:
        out(f"restore: checking {archive}")
        started = time.monotonic()
        unpacked = archive_format.unpack(archive, staging)
        checked = time.monotonic() - started
        config = unpacked.path(archive_format.CONFIG_MEMBER)
        if not config.is_file():
            raise BackupError(
                f"{archive} cannot be restored: it holds no appliance.yml; nothing was changed."
            )
        restored = settings_module.load(config, must_exist=True)
        if restored.paths.root.resolve() != p.root.resolve():
            raise BackupError(
                f"{archive} was made with root: {restored.paths.root} and this host has "
                f"root: {p.root}; restore it onto a host with the same root (set root: in "
                f"{p.config_file} first); nothing was changed."
            )
        manifest = unpacked.manifest
        allowed = _restorable(restored)
        for member in sorted(unpacked.members):
            if member.startswith(archive_format.ROOT_PREFIX) and not allowed(member):
                raise BackupError(
                    f"{archive} cannot be restored: its member {member} is not a file a backup "
                    f"writes (config, secrets, certificates, auth database); nothing was changed."
                )
        out(
            f"restore: {len(unpacked.members)} files checked (SHA-256) in {checked:.2f} s, made "
            f"{manifest.get('created')} on {manifest.get('host')} by appliance "
            f"{manifest.get('appliance_version')}"
        )
        images = manifest.get("storage", {})
        with_images = images.get("images") == "included"
        for kind, line in found.items():
            if kind == "registry" and not with_images:
                out(f"restore: keeping {line}: the archive holds no images")
            else:
                out(f"restore: replacing {line} (--force)")
        out(
            f"restore: replacing {p.config_file}, {p.secrets_file} (the signing key: tokens "
            f"this host signed stop verifying) and the certificates under {p.ssl_dir}"
        )
        if stop_services is not None:
            stop_services(out)
        new_root = registry.filesystem_root(restored) if restored.registry.enable else None
        database_member = archive_format.root_member(p.root, Path(restored.auth.database_path))
        with (
            reconfigure_lock(p.lock_file, out),
            storage_lock(p.registry_storage_lock, "restore"),
        ):
            for member in sorted(unpacked.members):
                source = unpacked.path(member)
                if member == archive_format.CONFIG_MEMBER:
                    _move(source, p.config_file)
                elif member.startswith(archive_format.ROOT_PREFIX):
                    target = p.root / member[len(archive_format.ROOT_PREFIX) :]
                    if member == database_member:
                        for suffix in SUFFIXES:  # the old database's journal is not ours
                            Path(f"{target}{suffix}").unlink(missing_ok=True)
                    _move(source, target)
            if p.initial_root_password_file.exists() and not any(
                m == archive_format.root_member(p.root, p.initial_root_password_file)
                for m in unpacked.members
            ):
                p.initial_root_password_file.unlink()
                out(
                    f"restore: removed {p.initial_root_password_file}: the restored "
                    f"database's root has the password it had"
                )
            tree = unpacked.registry_tree()
            if new_root is not None and with_images:
                new_root.mkdir(parents=True, exist_ok=True)
                old = new_root / "docker"
                if old.exists():
                    shutil.rmtree(old)
                if tree is not None and (tree / "docker").is_dir():
                    for directory, dirs, _ in os.walk(tree):
                        for name in dirs:
                            os.chmod(Path(directory) / name, 0o755)
                    _move_tree(tree / "docker", old)
            elif tree is not None:
                out("restore: the archive's registry data is not restored (no filesystem storage)")
        if not with_images:
            out(f"restore: {images.get('note', 'the archive holds no images')}.")
        hand_over(restored)
        out("restore: files in place; reconfiguring")
        return settings_module.load(p.config_file, must_exist=True)
    except BackupError as error:
        out.note(f"restore: failed: {error}")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        out.save()


def _restorable(restored: Settings) -> Callable[[str], bool]:
    """Whether a root/ member is one of the files a backup of these settings holds: an
    archive's checksums say it is whole, not who made it, so a member named
    root/etc/passwd is refused whatever its checksum."""
    p = restored.paths
    rn = restored.registry_nginx
    files = {p.secrets_file, p.initial_root_password_file, Path(restored.auth.database_path)}
    files |= {Path(name) for name in (rn.ssl_certificate, rn.ssl_certificate_key) if name}
    names = {archive_format.root_member(p.root, path) for path in files} - {None}
    ssl_prefix = archive_format.root_member(p.root, p.ssl_dir)

    def allowed(member: str) -> bool:
        return member in names or bool(ssl_prefix and member.startswith(ssl_prefix + "/"))

    return allowed


def _move_tree(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system
        shutil.copytree(source, target, symlinks=True)
