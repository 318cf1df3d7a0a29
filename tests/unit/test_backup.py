"""The archive format (appliance/backup.py): what a backup writes, and every archive a
restore must refuse before it changes anything."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from appliance import backup
from appliance.backup import BackupError

V2 = "docker/registry/v2"


def write_archive(directory: Path, files: dict[str, bytes], name: str = "a.tar.gz") -> Path:
    with backup.new_archive(directory, name) as writer:
        for member, data in files.items():
            writer.add_bytes(member, data, 0o640)
        writer.manifest = {"format": backup.FORMAT}
    return directory / name


FILES = {
    "config/appliance.yml": b"root: /\n",
    "root/etc/appliance/appliance-secrets.json": b'{"auth_secret": "s"}\n',
    "registry/docker/registry/v2/blobs/sha256/ab/abcd/data": b"layer bytes " * 1000,
}


def test_round_trip_keeps_every_file_and_mode(tmp_path):
    archive = write_archive(tmp_path / "out", FILES)
    assert archive.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "out").glob(".*partial"))
    unpacked = backup.unpack(archive, tmp_path / "staging")
    for member, data in FILES.items():
        assert unpacked.path(member).read_bytes() == data
        assert unpacked.path(member).stat().st_mode & 0o777 == 0o640
    entry = unpacked.members["config/appliance.yml"]
    assert entry["sha256"] == hashlib.sha256(FILES["config/appliance.yml"]).hexdigest()
    with tarfile.open(archive) as tar:
        assert tar.getnames()[-1] == backup.MANIFEST


def test_an_archive_is_never_overwritten(tmp_path):
    archive = write_archive(tmp_path, FILES)
    before = archive.read_bytes()
    with pytest.raises(BackupError, match="never overwritten"):
        write_archive(tmp_path, {"config/appliance.yml": b"other"})
    assert archive.read_bytes() == before


def test_a_failed_backup_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with backup.new_archive(tmp_path, "b.tar.gz") as writer:
            writer.add_bytes("config/appliance.yml", b"x")
            raise RuntimeError("disk gone")
    assert os.listdir(tmp_path) == []


def rewrite(archive: Path, change) -> None:  # noqa: ANN001 - a function of the tar bytes
    """Decompress, change the tar bytes, compress again: gzip's own CRC stays valid, so
    only the manifest's checksums can tell."""
    raw = bytearray(gzip.decompress(archive.read_bytes()))
    change(raw)
    archive.write_bytes(gzip.compress(bytes(raw)))


def refused(archive: Path, staging: Path, match: str) -> None:
    with pytest.raises(BackupError, match=match) as caught:
        backup.unpack(archive, staging)
    assert "nothing was changed" in str(caught.value)


def test_truncated_archive_is_refused(tmp_path):
    archive = write_archive(tmp_path, FILES)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    refused(archive, tmp_path / "staging", "truncated or damaged")


def test_a_flipped_byte_inside_a_member_is_refused(tmp_path):
    archive = write_archive(tmp_path, FILES)

    def flip(raw: bytearray) -> None:
        at = raw.index(b"layer bytes")
        raw[at] ^= 0x01

    rewrite(archive, flip)
    refused(archive, tmp_path / "staging", "checksum of registry/.*/data does not match")


def test_an_edited_manifest_is_refused(tmp_path):
    archive = write_archive(tmp_path, FILES)
    digest = hashlib.sha256(FILES["config/appliance.yml"]).hexdigest().encode()

    def edit(raw: bytearray) -> None:
        at = raw.index(digest)
        raw[at : at + 1] = b"0" if raw[at : at + 1] != b"0" else b"1"

    rewrite(archive, edit)
    refused(archive, tmp_path / "staging", "checksum of config/appliance.yml")


def crafted(tmp_path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "crafted.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info.size = len(data) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
        body = json.dumps({"format": 1, "members": {}}).encode()
        manifest = tarfile.TarInfo(backup.MANIFEST)
        manifest.size = len(body)
        tar.addfile(manifest, io.BytesIO(body))
    return archive


@pytest.mark.parametrize(
    "name",
    ["root/../../etc/passwd", "../outside", "/etc/passwd", "root/./x", "root//x", "other/x"],
)
def test_a_member_that_leaves_the_restore_is_refused(tmp_path, name):
    archive = crafted(tmp_path, tarfile.TarInfo(name), b"owned")
    refused(archive, tmp_path / "staging", "points outside|not part of an appliance backup")
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    "kind, match", [(tarfile.SYMTYPE, "is a link"), (tarfile.LNKTYPE, "is a link"),
                    (tarfile.CHRTYPE, "device"), (tarfile.FIFOTYPE, "device")]
)  # fmt: skip
def test_links_and_devices_are_refused(tmp_path, kind, match):
    info = tarfile.TarInfo("root/etc/appliance/appliance-secrets.json")
    info.type = kind
    info.linkname = "/etc/shadow"
    refused(crafted(tmp_path, info), tmp_path / "staging", match)


def test_a_member_missing_from_the_manifest_is_refused(tmp_path):
    archive = crafted(tmp_path, tarfile.TarInfo("root/extra"), b"x")
    refused(archive, tmp_path / "staging", "not in its manifest")


def test_an_archive_without_manifest_is_refused(tmp_path):
    archive = tmp_path / "plain.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(__file__, arcname="root/file")
    refused(archive, tmp_path / "staging", "no MANIFEST.json")


def test_not_a_gzip_file_is_refused(tmp_path):
    archive = tmp_path / "junk.tar.gz"
    archive.write_bytes(b"not an archive at all")
    refused(archive, tmp_path / "staging", "truncated or damaged")


# ---------------------------------------------------------------- the registry's data


def registry_tree(root: Path, blobs: dict[str, bytes], links: dict[str, str]) -> None:
    for digest, data in blobs.items():
        path = root / V2 / "blobs/sha256" / digest[:2] / digest / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for relative, text in links.items():
        path = root / V2 / "repositories" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_blobs_come_before_repositories_and_the_window_wraps_the_links(tmp_path):
    storage = tmp_path / "data"
    registry_tree(
        storage,
        {"aa11": b"manifest", "bb22": b"layer"},
        {
            "team/app/_manifests/tags/v1/current/link": "sha256:aa11",
            "team/app/_manifests/revisions/sha256/aa11/link": "sha256:aa11",
            "team/app/_layers/sha256/bb22/link": "sha256:bb22",
            "team/app/_uploads/u1/data": "half a push",
        },
    )
    events: list[str] = []

    @contextlib.contextmanager
    def window():
        events.append("window opened")
        # A push finishing while the window opens: its blob, then its link.
        registry_tree(
            storage, {"cc33": b"late layer"}, {"team/app/_layers/sha256/cc33/link": "sha256:cc33"}
        )
        yield
        events.append("window closed")

    with backup.new_archive(tmp_path / "out", "r.tar.gz") as writer:
        original = writer.add_bytes

        def add_bytes(name, data, mode=0o600, mtime=0):  # noqa: ANN001
            events.append(f"link {name.rsplit('/', 3)[-3]}")
            original(name, data, mode, mtime)

        writer.add_bytes = add_bytes  # type: ignore[method-assign]
        copy = backup.copy_registry_data(storage, writer, window)
        writer.manifest = {"format": backup.FORMAT}
    assert (copy.blobs_before, copy.blobs_inside, copy.links) == (2, 1, 4)
    assert events[0] == "window opened" and events[-1] == "window closed"
    with tarfile.open(tmp_path / "out/r.tar.gz") as tar:
        names = tar.getnames()
    blob_positions = [i for i, n in enumerate(names) if "/blobs/" in n]
    link_positions = [i for i, n in enumerate(names) if "/repositories/" in n]
    assert max(blob_positions) < min(link_positions)  # blobs before repositories
    assert not any("_uploads" in n for n in names)  # a push in progress is not copied
    assert f"registry/{V2}/blobs/sha256/cc/cc33/data" in names


def test_database_snapshot_is_a_consistent_copy(tmp_path):
    import sqlite3

    db = tmp_path / "auth.db"
    connection = sqlite3.connect(db)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE users (username TEXT)")
    connection.execute("INSERT INTO users VALUES ('root'), ('alice')")
    connection.commit()  # in the WAL, not yet in the main file
    backup.snapshot_database(db, tmp_path / "copy.db")
    connection.close()
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("SELECT username FROM users ORDER BY 1").fetchall() == [
        ("alice",),
        ("root",),
    ]
    assert backup.database_contents(tmp_path / "copy.db") == []  # no such tables: no data


def test_archive_names_differ_by_the_second_and_say_the_host():
    from datetime import UTC, datetime

    name = backup.archive_name("reg/01", datetime(2026, 11, 28, 14, 1, 2, tzinfo=UTC))
    assert name == "appliance-backup-reg_01-20261128T140102Z.tar.gz"


def test_a_second_archive_in_the_same_second_gets_a_new_name(tmp_path):
    (tmp_path / "b-20261128T140102Z.tar.gz").write_bytes(b"")
    (tmp_path / "b-20261128T140102Z-2.tar.gz").write_bytes(b"")
    name = backup.unused_name(tmp_path, "b-20261128T140102Z.tar.gz")
    assert name == "b-20261128T140102Z-3.tar.gz"


def test_compressed_layers_are_stored_and_the_rest_compressed_readable_by_gnu_tar(tmp_path):
    import shutil
    import subprocess

    layer = gzip.compress(os.urandom(1 << 20))  # a layer as registries hold them
    text = b"a very compressible line of a database or a link file\n" * 20000
    archive = write_archive(
        tmp_path,
        {
            "registry/docker/registry/v2/blobs/sha256/aa/aaaa/data": layer,
            "root/var/opt/appliance/auth/auth.db": text,
        },
    )
    size = archive.stat().st_size
    assert len(layer) < size < len(layer) + len(text) // 20
    members = gzip.open(archive).read()  # several gzip members, read as one stream
    assert layer in members and text in members
    if shutil.which("tar"):
        listing = subprocess.run(
            ["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listing[-1] == backup.MANIFEST and len(listing) == 3
