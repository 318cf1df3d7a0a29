"""What `restore` does with an archive's files (recipes/backup_restore.py), on a root
with no services: where each member goes, and the members it refuses although their
checksums match (a checksum says an archive is whole, not who made it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import backup
from appliance import settings as settings_module
from appliance.backup import BackupError
from recipes import backup_restore

V2 = "docker/registry/v2"


@pytest.fixture
def host(tmp_path: Path) -> settings_module.Settings:
    config = tmp_path / "etc/appliance/appliance.yml"
    config.parent.mkdir(parents=True)
    config.write_text(f"root: {tmp_path}\n")
    return settings_module.load(config, must_exist=True)


def archive_of(host: settings_module.Settings, files: dict[str, bytes], images: str) -> Path:
    directory = host.paths.root / "archives"
    with backup.new_archive(directory, "a.tar.gz") as writer:
        writer.add_bytes("config/appliance.yml", f"root: {host.paths.root}\n".encode(), 0o644)
        for member, data in files.items():
            writer.add_bytes(member, data, 0o600)
        writer.manifest = {"format": backup.FORMAT, "storage": {"images": images, "note": "n"}}
    return directory / "a.tar.gz"


def test_a_member_outside_what_a_backup_writes_is_refused(host):
    archive = archive_of(
        host,
        {
            "root/etc/appliance/appliance-secrets.json": b"{}",
            "root/etc/cron.d/evil": b"* * * * * root sh -c owned\n",
        },
        "included",
    )
    with pytest.raises(BackupError, match="root/etc/cron.d/evil is not a file a backup writes"):
        backup_restore.restore(host, archive)
    assert not (host.paths.root / "etc/cron.d").exists()
    assert not host.paths.secrets_file.exists()  # nothing written at all
    assert not (host.paths.data_dir / ".restore-staging").exists()


def test_files_go_where_the_settings_put_them(host):
    archive = archive_of(
        host,
        {
            "root/etc/appliance/appliance-secrets.json": b'{"auth_secret": "x"}',
            "root/etc/appliance/ssl/localhost.crt": b"certificate",
            "root/var/opt/appliance/auth/auth.db": b"database",
            f"registry/{V2}/blobs/sha256/ab/abcd/data": b"blob",
        },
        "included",
    )
    stale_wal = host.paths.auth_dir / "auth.db-wal"
    stale_wal.parent.mkdir(parents=True)
    stale_wal.write_bytes(b"the old database's journal")
    backup_restore.restore(host, archive)
    p = host.paths
    assert p.secrets_file.read_bytes() == b'{"auth_secret": "x"}'
    assert p.secrets_file.stat().st_mode & 0o777 == 0o600
    assert (p.ssl_dir / "localhost.crt").read_bytes() == b"certificate"
    assert (p.auth_dir / "auth.db").read_bytes() == b"database"
    assert not stale_wal.exists()
    blob = Path(host.registry.storage_path) / V2 / "blobs/sha256/ab/abcd/data"
    assert blob.read_bytes() == b"blob"
    assert blob.parent.stat().st_mode & 0o777 == 0o755  # the registry's account traverses it
    assert list((p.log_dir / "restore").glob("*.log"))


def put_repository(host: settings_module.Settings) -> Path:
    link = (
        Path(host.registry.storage_path)
        / V2
        / "repositories/team/app/_manifests/tags/v1/current/link"
    )
    link.parent.mkdir(parents=True)
    link.write_text("sha256:abcd")
    return link


def test_a_host_with_images_is_refused_unless_forced(host):
    link = put_repository(host)
    archive = archive_of(host, {f"registry/{V2}/blobs/sha256/ab/abcd/data": b"b"}, "included")
    with pytest.raises(BackupError, match=r"the registry's data in .* \(1 repositories"):
        backup_restore.restore(host, archive)
    assert link.exists()
    backup_restore.restore(host, archive, force=True)
    assert not link.exists()  # replaced by the archive's data


def test_force_with_an_archive_without_images_keeps_the_images(host, capsys):
    link = put_repository(host)
    archive = archive_of(host, {"root/etc/appliance/appliance-secrets.json": b"{}"}, "skipped")
    backup_restore.restore(host, archive, force=True, stream=None)
    assert link.read_text() == "sha256:abcd"


def test_an_archive_of_another_root_is_refused(host, tmp_path):
    directory = host.paths.root / "archives"
    with backup.new_archive(directory, "other.tar.gz") as writer:
        writer.add_bytes("config/appliance.yml", b"root: /somewhere/else\n")
        writer.manifest = {"format": backup.FORMAT}
    with pytest.raises(BackupError, match="was made with root: /somewhere/else"):
        backup_restore.restore(host, directory / "other.tar.gz")
    assert not host.paths.secrets_file.exists()
