"""Resources: one piece of desired host state each.

A resource reads the host (`current()`), decides (`plan(current)` returns the changes,
empty when the host already matches) and acts (`apply()`, called only for a non-empty
plan). Reading and deciding are kept apart so plans are table-tested without touching
the host, and so `--dry-run` is just "plan, print, stop". Resources never print.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from appliance.errors import ResourceError


@dataclass(frozen=True)
class Notify:
    """A delayed request to a supervised service, queued when a resource changes."""

    action: str  # "restart" or "reload"
    service: str


def restart(service: str) -> Notify:
    return Notify("restart", service)


def reload(service: str) -> Notify:
    return Notify("reload", service)


@dataclass(frozen=True)
class Change:
    summary: str
    diff: str = ""


class Resource:
    kind: ClassVar[str] = "resource"
    name: str
    notifies: tuple[Notify, ...] = ()
    sensitive: bool = False

    def current(self) -> Any:
        raise NotImplementedError

    def plan(self, current: Any) -> list[Change]:
        raise NotImplementedError

    def apply(self) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


# ---------------------------------------------------------------- ownership


def uid_of(owner: str | None) -> int | None:
    if owner is None:
        return None
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ResourceError(
            f"user {owner} does not exist; create it or let reconfigure "
            f"manage accounts (manage_accounts: true)."
        ) from None


def gid_of(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ResourceError(f"group {group} does not exist.") from None


@dataclass(frozen=True)
class PathState:
    exists: bool
    is_dir: bool = False
    is_link: bool = False
    mode: int = 0
    uid: int = -1
    gid: int = -1
    content: bytes | None = None
    link_target: str | None = None


def read_path(path: Path, with_content: bool = False) -> PathState:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return PathState(exists=False)
    is_link = stat.S_ISLNK(st.st_mode)
    content = None
    if with_content and stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    return PathState(
        exists=True,
        is_dir=stat.S_ISDIR(st.st_mode),
        is_link=is_link,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        content=content,
        link_target=os.readlink(path) if is_link else None,
    )


def _ownership_changes(
    current: PathState, mode: int, owner: str | None, group: str | None
) -> list[Change]:
    changes = []
    if current.mode != mode:
        changes.append(Change(f"mode {current.mode:04o} -> {mode:04o}"))
    uid, gid = uid_of(owner), gid_of(group)
    if uid is not None and current.uid != uid:
        changes.append(Change(f"owner -> {owner}"))
    if gid is not None and current.gid != gid:
        changes.append(Change(f"group -> {group}"))
    return changes


def _chown(path: Path, owner: str | None, group: str | None) -> None:
    uid, gid = uid_of(owner), gid_of(group)
    if uid is not None or gid is not None:
        os.chown(
            path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False
        )


def atomic_write(
    path: Path,
    content: bytes,
    mode: int,
    owner: str | None = None,
    group: str | None = None,
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Write so that a reader sees the old file or the new one, never a part.

    The temporary file sits in the same directory (same filesystem, so os.replace is
    atomic), gets the final mode and owner before it is visible, and is fsynced. A
    `verify` callback sees the finished temporary file and may refuse it (nginx -t).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        _chown(tmp_path, owner, group)
        if verify:
            verify(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------- resources


class PathResource(Resource):
    """A resource that is one path on the host, named by it."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def current(self) -> PathState:
        return read_path(self.path)


@dataclass
class Directory(PathResource):
    path: Path
    mode: int = 0o755
    owner: str | None = None
    group: str | None = None
    notifies: tuple[Notify, ...] = ()
    kind: ClassVar[str] = "directory"

    def current(self) -> PathState:
        return read_path(self._managed_path())

    def _managed_path(self) -> Path:
        """The directory itself, or the one a symlink here points to.

        Admins move data to a bigger disk and leave a symlink at the old place; that
        directory is then the one to keep at the right mode and owner.
        """
        if self.path.is_symlink() and self.path.is_dir():
            return self.path.resolve()
        return self.path

    def plan(self, current: PathState) -> list[Change]:
        if not current.exists:
            return [Change("create")]
        if not current.is_dir:
            raise self._in_the_way()
        return _ownership_changes(current, self.mode, self.owner, self.group)

    def _in_the_way(self) -> ResourceError:
        return ResourceError(f"{self.path} exists and is not a directory; move it away.")

    def apply(self) -> None:
        path = self._managed_path()
        current = read_path(path)
        if current.exists and not current.is_dir:
            raise self._in_the_way()
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, self.mode)
        _chown(path, self.owner, self.group)


def unified_diff(old: bytes | None, new: bytes, path: str) -> str:
    try:
        old_text = (old or b"").decode().splitlines(keepends=True)
        new_text = new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return "(binary content differs)\n"
    import difflib  # only a run that changes a file pays for it

    lines = difflib.unified_diff(
        old_text, new_text, fromfile=f"{path} (current)", tofile=f"{path} (new)", n=2
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


@dataclass
class File(PathResource):
    path: Path
    content: bytes | str
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None
    sensitive: bool = False
    notifies: tuple[Notify, ...] = ()
    verify: Callable[[Path], None] | None = None
    kind: ClassVar[str] = "file"

    def __post_init__(self) -> None:
        if isinstance(self.content, str):
            self.content = self.content.encode()

    def current(self) -> PathState:
        return read_path(self.path, with_content=True)

    def plan(self, current: PathState) -> list[Change]:
        if not current.exists:
            diff = "" if self.sensitive else unified_diff(None, self.content, self.name)
            return [Change("create", diff)]
        if current.is_dir:
            raise ResourceError(f"{self.path} is a directory; move it away.")
        if current.is_link:
            return [Change("replace a link with a file")]
        changes = []
        if current.content != self.content:
            diff = "" if self.sensitive else unified_diff(current.content, self.content, self.name)
            changes.append(Change("update content", diff))
        return changes + _ownership_changes(current, self.mode, self.owner, self.group)

    def apply(self) -> None:
        current = read_path(self.path, with_content=True)
        if current.is_dir:
            raise ResourceError(f"{self.path} is a directory; move it away.")
        if current.exists and current.content == self.content and not current.is_link:
            os.chmod(self.path, self.mode)
            _chown(self.path, self.owner, self.group)
            return
        if current.is_link:
            self.path.unlink()
        atomic_write(self.path, self.content, self.mode, self.owner, self.group, self.verify)


def files_dir() -> Path:
    """Templates: the checkout's files/, or the copy a package installs under its prefix."""
    import sys

    checkout = Path(__file__).resolve().parent.parent / "files"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share/appliance/files"


_environment: jinja2.Environment | None = None
_bytecode_cache_dir: Path | None = None


def use_template_cache(directory: Path) -> None:
    """Keep compiled templates in `directory` (ours, 0700: never a shared /tmp path that
    another user could pre-create). A no-op reconfigure then skips jinja2's compiler,
    a tenth of its time."""
    global _bytecode_cache_dir, _environment
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _bytecode_cache_dir = directory
    _environment = None


def template_environment() -> jinja2.Environment:
    global _environment
    if _environment is None:
        import json

        import yaml

        cache = (
            jinja2.FileSystemBytecodeCache(str(_bytecode_cache_dir))
            if _bytecode_cache_dir
            else None
        )
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(files_dir())),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
            bytecode_cache=cache,
        )
        env.filters["yaml"] = lambda v: yaml.safe_dump(
            v, default_flow_style=False, sort_keys=False
        ).rstrip("\n")
        env.filters["json"] = lambda v: json.dumps(v)
        _environment = env
    return _environment


def render(source: str, context: dict) -> str:
    try:
        return template_environment().get_template(source).render(**context)
    except jinja2.UndefinedError as exc:
        raise ResourceError(
            f"template {source}: {exc.message}; this is a bug in the recipe that renders it."
        ) from None
    except jinja2.TemplateNotFound:
        raise ResourceError(
            f"template {source} is missing under {files_dir()}; reinstall the package."
        ) from None


class Template(File):
    """A file whose content is a jinja2 template rendered in memory."""

    kind: ClassVar[str] = "template"

    def __init__(self, path: Path, source: str, context: dict, **kwargs: Any):
        super().__init__(path=path, content=render(source, context), **kwargs)
        self.source = source


@dataclass
class Link(PathResource):
    path: Path
    target: str
    notifies: tuple[Notify, ...] = ()
    kind: ClassVar[str] = "link"

    def plan(self, current: PathState) -> list[Change]:
        if not current.exists:
            return [Change(f"create -> {self.target}")]
        if current.is_dir:
            raise ResourceError(f"{self.path} is a directory; cannot replace it with a link.")
        if not current.is_link:
            return [Change(f"replace with a link -> {self.target}")]
        if current.link_target != self.target:
            return [Change(f"retarget {current.link_target} -> {self.target}")]
        return []

    def apply(self) -> None:
        current = read_path(self.path)
        if current.exists and current.is_dir and not current.is_link:
            raise ResourceError(f"{self.path} is a directory; cannot replace it with a link.")
        tmp = self.path.with_name(f".{self.path.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(self.target, tmp)
        os.replace(tmp, self.path)


@dataclass
class Absent(PathResource):
    """A path that must not exist (a disabled service's program file, say)."""

    path: Path
    recursive: bool = False
    notifies: tuple[Notify, ...] = ()
    kind: ClassVar[str] = "absent"

    def plan(self, current: PathState) -> list[Change]:
        if current.is_dir and not self.recursive:
            raise ResourceError(f"{self.path} is a directory; refusing to remove it.")
        return [Change("remove")] if current.exists else []

    def apply(self) -> None:
        current = read_path(self.path)
        if current.is_dir and not current.is_link:
            if not self.recursive:
                raise ResourceError(f"{self.path} is a directory; refusing to remove it.")
            shutil.rmtree(self.path)
        elif current.exists:
            self.path.unlink()


@dataclass(frozen=True)
class CertificateState:
    cert_pem: bytes | None
    key_pem: bytes | None


@dataclass
class SelfSignedCertificate(Resource):
    """A key and self-signed certificate: generated once, replaced only when it must be.

    It is regenerated when missing, when the key does not match, when the names changed,
    or within `renew_before` of expiry; never just because reconfigure ran.
    """

    cert_path: Path
    key_path: Path
    hostnames: list[str]
    key_type: str = "ec-p256"
    days: int = 825
    renew_before: timedelta = timedelta(days=30)
    owner: str | None = None
    group: str | None = None
    notifies: tuple[Notify, ...] = ()
    now: datetime | None = None
    kind: ClassVar[str] = "certificate"
    _reason: str = field(default="", init=False)

    @property
    def name(self) -> str:
        return str(self.cert_path)

    def current(self) -> CertificateState:
        def read(path: Path) -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return CertificateState(read(self.cert_path), read(self.key_path))

    def plan(self, current: CertificateState) -> list[Change]:
        from appliance import pki

        now = self.now or datetime.now(UTC)
        if current.cert_pem is None or current.key_pem is None:
            return [Change("create self-signed for " + ", ".join(self.hostnames))]
        try:
            matches = pki.public_key_matches(current.cert_pem, current.key_pem)
        except pki.CertificateError as exc:
            # Our own files, damaged (a full disk, a bad copy): make new ones.
            return [Change(f"regenerate: {exc}")]
        if not matches:
            return [Change("regenerate: the key does not match the certificate")]
        due, reason = pki.should_renew(current.cert_pem, now, self.renew_before, self.hostnames)
        return [Change(f"regenerate: {reason}")] if due else []

    def apply(self) -> None:
        from appliance import pki

        key = pki.generate_private_key(self.key_type)
        cert = pki.self_signed_certificate(key, self.hostnames, days=self.days, now=self.now)
        # Key first: a reader that sees the new certificate must find its key.
        atomic_write(self.key_path, key, 0o600, self.owner, self.group)
        atomic_write(self.cert_path, cert, 0o644, self.owner, self.group)
