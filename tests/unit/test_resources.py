"""Resources: (current state x desired state) -> changes, and writes nobody sees half of.

Plans are tested as tables on PathState values built by hand (no disk), then a second
table sets the same states up on disk and checks that apply() converges: after it,
the plan is empty.
"""

from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import pki, resources
from appliance.errors import ResourceError
from appliance.resources import (
    Absent,
    CertificateState,
    Change,
    Directory,
    File,
    Link,
    PathState,
    SelfSignedCertificate,
    Template,
    atomic_write,
)

P = Path("/srv/x")
DIR_755 = PathState(exists=True, is_dir=True, mode=0o755, uid=0, gid=0)
FILE_644 = PathState(exists=True, mode=0o644, uid=0, gid=0, content=b"a\nb\n")
LINK = PathState(exists=True, is_link=True, mode=0o777, uid=0, gid=0, link_target="/srv/old")
MISSING = PathState(exists=False)


# ---------------------------------------------------------------- Directory

DIRECTORY_PLANS = {
    "missing": (MISSING, Directory(P), [Change("create")]),
    "exists as wanted": (DIR_755, Directory(P), []),
    "wrong mode": (DIR_755, Directory(P, 0o700), [Change("mode 0755 -> 0700")]),
    "wrong owner and group": (
        PathState(exists=True, is_dir=True, mode=0o750, uid=1000, gid=1000),
        Directory(P, 0o750, owner="root", group="root"),
        [Change("owner -> root"), Change("group -> root")],
    ),
    "owner not managed": (
        PathState(exists=True, is_dir=True, mode=0o755, uid=1000, gid=1000),
        Directory(P),
        [],
    ),
}


@pytest.mark.parametrize(
    ("current", "desired", "expected"), list(DIRECTORY_PLANS.values()), ids=list(DIRECTORY_PLANS)
)
def test_directory_plan(current: PathState, desired: Directory, expected: list) -> None:
    assert desired.plan(current) == expected


@pytest.mark.parametrize("current", [FILE_644, LINK], ids=["file", "link"])
def test_directory_refuses_what_is_in_the_way(current: PathState) -> None:
    with pytest.raises(
        ResourceError,
        match=r"^/srv/x exists and is not a directory; "
        r"move it away\.$",
    ):
        Directory(P).plan(current)


def test_unknown_owner_is_a_clear_error() -> None:
    with pytest.raises(ResourceError, match="user no-such-user does not exist"):
        Directory(P, owner="no-such-user").plan(DIR_755)


# ---------------------------------------------------------------- File

NEW = b"a\nc\n"
DIFF = "--- /srv/x (current)\n+++ /srv/x (new)\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n"

FILE_PLANS = {
    "missing": (
        MISSING,
        File(P, NEW),
        [Change("create", "--- /srv/x (current)\n+++ /srv/x (new)\n@@ -0,0 +1,2 @@\n+a\n+c\n")],
    ),
    "same content": (FILE_644, File(P, b"a\nb\n"), []),
    "str content equals bytes": (FILE_644, File(P, "a\nb\n"), []),
    "different content": (FILE_644, File(P, NEW), [Change("update content", DIFF)]),
    "mode only": (FILE_644, File(P, b"a\nb\n", 0o600), [Change("mode 0644 -> 0600")]),
    "content and mode": (
        FILE_644,
        File(P, NEW, 0o600),
        [Change("update content", DIFF), Change("mode 0644 -> 0600")],
    ),
    "owner only": (
        PathState(exists=True, mode=0o644, uid=1000, gid=0, content=b"a\nb\n"),
        File(P, b"a\nb\n", owner="root"),
        [Change("owner -> root")],
    ),
    "no trailing newline": (
        FILE_644,
        File(P, b"a\nb"),
        [
            Change(
                "update content",
                "--- /srv/x (current)\n+++ /srv/x (new)\n@@ -1,2 +1,2 @@\n a\n-b\n+b\n",
            )
        ],
    ),
    "sensitive missing: no content shown": (
        MISSING,
        File(P, b"secret\n", sensitive=True),
        [Change("create")],
    ),
    "sensitive changed: no diff": (
        FILE_644,
        File(P, b"secret\n", 0o600, sensitive=True),
        [Change("update content"), Change("mode 0644 -> 0600")],
    ),
    "binary": (
        PathState(exists=True, mode=0o644, content=b"\xff\x00"),
        File(P, b"\xfe\x00"),
        [Change("update content", "(binary content differs)\n")],
    ),
    "link in the way": (LINK, File(P, NEW), [Change("replace a link with a file")]),
}


@pytest.mark.parametrize(
    ("current", "desired", "expected"), list(FILE_PLANS.values()), ids=list(FILE_PLANS)
)
def test_file_plan(current: PathState, desired: File, expected: list) -> None:
    assert desired.plan(current) == expected


def test_file_refuses_to_replace_a_directory() -> None:
    with pytest.raises(ResourceError, match=r"^/srv/x is a directory; move it away\.$"):
        File(P, NEW).plan(DIR_755)


# ---------------------------------------------------------------- Link and Absent

LINK_PLANS = {
    "missing": (MISSING, Link(P, "/srv/new"), [Change("create -> /srv/new")]),
    "points elsewhere": (LINK, Link(P, "/srv/new"), [Change("retarget /srv/old -> /srv/new")]),
    "points right": (LINK, Link(P, "/srv/old"), []),
    "file in the way": (FILE_644, Link(P, "/srv/new"), [Change("replace with a link -> /srv/new")]),
}


@pytest.mark.parametrize(
    ("current", "desired", "expected"), list(LINK_PLANS.values()), ids=list(LINK_PLANS)
)
def test_link_plan(current: PathState, desired: Link, expected: list) -> None:
    assert desired.plan(current) == expected


def test_link_refuses_to_replace_a_directory() -> None:
    with pytest.raises(ResourceError, match="is a directory; cannot replace it with a link"):
        Link(P, "/srv/new").plan(DIR_755)


ABSENT_PLANS = {
    "missing": (MISSING, Absent(P), []),
    "file": (FILE_644, Absent(P), [Change("remove")]),
    "link": (LINK, Absent(P), [Change("remove")]),
    "directory, recursive": (DIR_755, Absent(P, recursive=True), [Change("remove")]),
}


@pytest.mark.parametrize(
    ("current", "desired", "expected"), list(ABSENT_PLANS.values()), ids=list(ABSENT_PLANS)
)
def test_absent_plan(current: PathState, desired: Absent, expected: list) -> None:
    assert desired.plan(current) == expected


def test_absent_refuses_a_directory_unless_recursive() -> None:
    with pytest.raises(ResourceError, match="is a directory; refusing to remove it"):
        Absent(P).plan(DIR_755)


# ---------------------------------------------------------------- the same, on disk


def make(path: Path, state: str) -> None:
    """Put `state` at path: missing, dir:MODE, file:MODE:CONTENT, link:TARGET."""
    kind, _, rest = state.partition(":")
    if kind == "dir":
        path.mkdir()
        os.chmod(path, int(rest, 8))
    elif kind == "file":
        mode, _, content = rest.partition(":")
        path.write_text(content)
        os.chmod(path, int(mode, 8))
    elif kind == "link":
        path.symlink_to(rest)


ON_DISK = {
    "directory created": ("missing", lambda p: Directory(p, 0o750)),
    "directory mode fixed": ("dir:700", lambda p: Directory(p, 0o755)),
    "file created": ("missing", lambda p: File(p, "new\n", 0o640)),
    "file rewritten": ("file:644:old\n", lambda p: File(p, "new\n", 0o600)),
    "file mode fixed, content kept": ("file:600:same\n", lambda p: File(p, "same\n", 0o644)),
    "link over a file": ("file:644:x", lambda p: File(p, "new\n")),
    "link created": ("missing", lambda p: Link(p, "/etc/hostname")),
    "link retargeted": ("link:/etc/old", lambda p: Link(p, "/etc/hostname")),
    "file replaced by link": ("file:644:x", lambda p: Link(p, "/etc/hostname")),
    "file removed": ("file:644:x", lambda p: Absent(p)),
    "link removed": ("link:/nowhere", lambda p: Absent(p)),
    "tree removed": ("dir:755", lambda p: Absent(p, recursive=True)),
}


@pytest.mark.parametrize(("before", "desired"), list(ON_DISK.values()), ids=list(ON_DISK))
def test_apply_converges(tmp_path: Path, before: str, desired) -> None:  # noqa: ANN001
    path = tmp_path / "x"
    make(path, before)
    resource = desired(path)
    assert resource.plan(resource.current()) != []
    resource.apply()
    assert resource.plan(resource.current()) == []


def test_file_on_disk_has_content_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    File(path, "version: 0.1\n", 0o640).apply()
    assert path.read_bytes() == b"version: 0.1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_directory_behind_a_symlink_is_managed_not_replaced(tmp_path: Path) -> None:
    disk = tmp_path / "bigdisk"
    disk.mkdir(mode=0o700)
    (disk / "image").write_text("layer")
    data = tmp_path / "data"
    data.symlink_to(disk)
    directory = Directory(data, 0o755)
    assert directory.plan(directory.current()) == [Change("mode 0700 -> 0755")]
    directory.apply()
    assert data.is_symlink() and (data / "image").read_text() == "layer"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o755
    assert directory.plan(directory.current()) == []


def test_a_dangling_symlink_is_in_the_way_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(tmp_path / "gone")
    directory = Directory(tmp_path / "data")
    with pytest.raises(ResourceError, match="is not a directory"):
        directory.plan(directory.current())


# ---------------------------------------------------------------- Template


def test_template_renders_with_filters_and_strict_undefined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc/config.yml.j2").write_text(
        "addr: {{ addr }}\nstorage:\n  {{ storage | yaml | indent(2) }}\nenv: {{ env | json }}\n"
    )
    (tmp_path / "svc/broken.j2").write_text("x: {{ missing }}\n")
    monkeypatch.setattr(resources, "files_dir", lambda: tmp_path)
    monkeypatch.setattr(resources, "_environment", None)

    t = Template(
        tmp_path / "out.yml",
        "svc/config.yml.j2",
        {"addr": "127.0.0.1:5000", "storage": {"s3": {"bucket": "a: b"}}, "env": {"A": "1"}},
    )
    assert t.content == (
        b'addr: 127.0.0.1:5000\nstorage:\n  s3:\n    bucket: \'a: b\'\nenv: {"A": "1"}\n'
    )
    assert str(t) == f"template {tmp_path / 'out.yml'}"
    with pytest.raises(ResourceError, match=r"^template svc/broken.j2: 'missing' is undefined"):
        Template(tmp_path / "out.yml", "svc/broken.j2", {})
    with pytest.raises(ResourceError, match=r"^template svc/absent.j2 is missing under"):
        Template(tmp_path / "out.yml", "svc/absent.j2", {})


# ---------------------------------------------------------------- SelfSignedCertificate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NAMES = ["registry.test", "127.0.0.1"]
KEY = pki.generate_private_key("ec-p256")
OTHER_KEY = pki.generate_private_key("ec-p256")


def cert(
    names: list[str] = NAMES,
    made: datetime = NOW - timedelta(days=100),
    days: int = 825,
    key: bytes = KEY,
) -> bytes:
    return pki.self_signed_certificate(key, names, days=days, now=made)


CERTIFICATE_PLANS = {
    "missing": (
        CertificateState(None, None),
        [Change("create self-signed for registry.test, 127.0.0.1")],
    ),
    "key missing": (
        CertificateState(cert(), None),
        [Change("create self-signed for registry.test, 127.0.0.1")],
    ),
    "valid": (CertificateState(cert(), KEY), []),
    "key does not match": (
        CertificateState(cert(), OTHER_KEY),
        [Change("regenerate: the key does not match the certificate")],
    ),
    "expires within the window": (
        CertificateState(cert(made=NOW - timedelta(days=15), days=40), KEY),
        [Change("regenerate: within the renewal window: expires in 24 days")],
    ),
    "just outside the window": (
        CertificateState(cert(made=NOW - timedelta(days=5), days=40), KEY),
        [],
    ),
    "expired": (
        CertificateState(cert(made=datetime(2026, 1, 1, tzinfo=UTC), days=40), KEY),
        [Change("regenerate: expired on 2026-02-09 23:55 UTC")],
    ),
    "host renamed": (
        CertificateState(cert(["old.test", "127.0.0.1"]), KEY),
        [
            Change(
                "regenerate: names changed: registry.test not covered "
                "(certificate covers: old.test, 127.0.0.1)"
            )
        ],
    ),
    "name added": (
        CertificateState(cert(["registry.test"]), KEY),
        [
            Change(
                "regenerate: names changed: 127.0.0.1 not covered "
                "(certificate covers: registry.test)"
            )
        ],
    ),
    "garbled certificate": (
        CertificateState(b"-----BEGIN CERTIFICATE-----\nxx\n", KEY),
        [Change("regenerate: The certificate file holds no readable PEM certificate.")],
    ),
    "garbled key": (
        CertificateState(cert(), b"not a key"),
        [Change("regenerate: The key file holds no readable unencrypted PEM private key.")],
    ),
}


@pytest.mark.parametrize(
    ("current", "expected"), list(CERTIFICATE_PLANS.values()), ids=list(CERTIFICATE_PLANS)
)
def test_certificate_plan(current: CertificateState, expected: list) -> None:
    desired = SelfSignedCertificate(Path("/srv/r.crt"), Path("/srv/r.key"), NAMES, now=NOW)
    assert desired.plan(current) == expected


def test_certificate_apply_writes_a_matching_pair_once(tmp_path: Path) -> None:
    resource = SelfSignedCertificate(tmp_path / "r.crt", tmp_path / "r.key", NAMES, now=NOW)
    resource.apply()
    cert_pem, key_pem = (tmp_path / "r.crt").read_bytes(), (tmp_path / "r.key").read_bytes()
    assert pki.check_certificate(cert_pem, key_pem, NAMES, NOW) == []
    assert stat.S_IMODE((tmp_path / "r.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "r.crt").stat().st_mode) == 0o644
    assert resource.plan(resource.current()) == []
    later = SelfSignedCertificate(
        tmp_path / "r.crt", tmp_path / "r.key", NAMES, now=NOW + timedelta(days=800)
    )
    assert later.plan(later.current()) == [
        Change("regenerate: within the renewal window: expires in 24 days")
    ]


# ---------------------------------------------------------------- atomic_write


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_prepares_the_final_file_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "conf/nginx.conf"
    target.parent.mkdir()
    target.write_text("old\n")
    seen = {}

    def verify(candidate: Path) -> None:
        st = candidate.stat()
        seen.update(
            parent=candidate.parent,
            mode=stat.S_IMODE(st.st_mode),
            content=candidate.read_bytes(),
            target=target.read_bytes(),
            same_device=st.st_dev == target.stat().st_dev,
        )

    atomic_write(target, b"new\n", 0o640, verify=verify)
    # At verify time - just before the rename - the temporary file is complete, in the
    # same directory, with the final mode, and the old file is still in place.
    assert seen == {
        "parent": target.parent,
        "mode": 0o640,
        "content": b"new\n",
        "target": b"old\n",
        "same_device": True,
    }
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert temp_files(target.parent) == []


def test_atomic_write_final_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "public.crt", b"x", 0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public.crt").stat().st_mode) == 0o644


def test_refused_write_leaves_the_old_file_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "nginx.conf"
    original = b"worker_processes 1;\n" * 1000
    target.write_bytes(original)
    os.chmod(target, 0o600)
    before = target.stat()

    def verify(candidate: Path) -> None:
        raise ResourceError("nginx -t: unexpected end of file")

    with pytest.raises(ResourceError, match="nginx -t"):
        atomic_write(target, b"broken {", 0o644, verify=verify)
    after = target.stat()
    assert target.read_bytes() == original
    assert (after.st_ino, stat.S_IMODE(after.st_mode), after.st_mtime_ns) == (
        before.st_ino,
        0o600,
        before.st_mtime_ns,
    )
    assert os.listdir(tmp_path) == ["nginx.conf"]


def test_refused_file_resource_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "registry.yml"
    target.write_text("version: 0.1\n")

    def verify(candidate: Path) -> None:
        raise ResourceError("registry refuses the config")

    resource = File(target, "version: 0.2\n", verify=verify)
    with pytest.raises(ResourceError):
        resource.apply()
    assert target.read_text() == "version: 0.1\n"
    assert temp_files(tmp_path) == []


def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "big.conf"
    versions = [bytes([ord("a") + i]) * (1024 * 1024 + i) for i in range(4)]
    atomic_write(target, versions[0], 0o644)
    stop = threading.Event()
    reads: list[int] = []
    bad: list[tuple[int, bytes]] = []

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            reads.append(len(data))
            if data not in versions:
                bad.append((len(data), data[:1]))

    thread = threading.Thread(target=reader)
    thread.start()
    writes = 0
    try:
        # Until the reader has had a fair look, however the scheduler treats it.
        while writes < 24 or (len(reads) < 50 and writes < 2000):
            atomic_write(target, versions[writes % len(versions)], 0o644)
            writes += 1
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert len(reads) >= 50
    assert len(set(reads)) > 1  # the reader really did see several versions
    assert temp_files(tmp_path) == []
