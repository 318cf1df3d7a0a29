"""supervisord: its own config, and one program file per service.

A service's program file is its "enable": present means supervised, absent means
stopped and forgotten (its data stays). A changed program file needs no notification:
supervisord's update restarts exactly the programs whose files changed. Other recipes
call `program()` for their program files and `disabled()` when their service is off.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from appliance import launcher
from appliance.errors import ConfigError
from appliance.resources import (
    Absent,
    Change,
    Directory,
    PathResource,
    PathState,
    Resource,
    Template,
)
from appliance.secrets import Secrets
from appliance.settings import Settings


def programs_dir(settings: Settings) -> Path:
    return settings.paths.supervisor_dir / "conf.d"


def service_log(settings: Settings, service: str) -> Path:
    return settings.paths.log_dir / service / "current"


def executable(name: str) -> str:
    """A program of our own virtualenv (appliance-ctl, appliance-auth, supervisord)."""
    return str(Path(sys.prefix) / "bin" / name)


def quote_environment(environment: dict[str, object]) -> str:
    """supervisord's environment= syntax: KEY="value",... sorted by key.

    supervisord splits it with a non-POSIX shlex: quotes group (commas may appear
    inside) but backslashes escape nothing, and surrounding quote characters are
    stripped. So a value is wrapped in whichever quote it does not contain, and `%` is
    doubled because supervisord expands %(ENV_X)s in its config values.
    """

    def value(key: str, raw: object) -> str:
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if "\n" in text or (text and (text[0] in "'\"" or text[-1] in "'\"")):
            raise ConfigError(
                f"{key}: an environment value cannot start or end with a "
                f"quote or contain a newline."
            )
        quote = '"' if '"' not in text else "'"
        if quote in text:
            raise ConfigError(f"{key}: an environment value cannot contain both ' and \".")
        return quote + text.replace("%", "%%") + quote

    return ",".join(f"{k}={value(k, v)}" for k, v in sorted(environment.items()))


# Group that may read the service logs: Debian's and EL's group for reading /var/log.
LOG_READERS = "adm"


def log_directory(settings: Settings, path: Path) -> Directory:
    """A directory supervisord (root) writes logs into: root's, readable by LOG_READERS.

    supervisord reopens `current` by path on every restart and rotation. Were the
    directory the service account's, the service could put a symlink there and have
    root append text of its clients' choosing to any file on the host.
    """
    if not settings.facts.run_as_root:
        return Directory(path, 0o750)
    return Directory(path, 0o750, owner="root", group=LOG_READERS)


@dataclass
class NoSymlink(PathResource):
    """A log file that must not be a symlink. Earlier releases gave each service its
    log directory; a symlink the service left at `current` then would still be followed
    by supervisord (root) after the directory became root's. It is removed (only the
    link: supervisord opens a new file)."""

    path: Path
    kind: ClassVar[str] = "log file"

    def plan(self, current: PathState) -> list[Change]:
        return [Change(f"remove symlink to {current.link_target}")] if current.is_link else []

    def apply(self) -> None:
        if self.path.is_symlink():
            self.path.unlink()


def program(
    settings: Settings,
    name: str,
    command: list[str],
    user: str | None = None,
    environment: dict[str, object] | None = None,
    directory: Path | None = None,
    stopsignal: str = "TERM",
    stopwaitsecs: int = 30,
    umask: str | None = None,
) -> list[Resource]:
    """The log directory and program file that make supervisord run `command` as `name`.

    The service's output goes to supervisord, which writes it into a directory the
    service cannot change (log_directory). A service that writes logs of its own (the
    auth service's audit log) gets a directory of its own for them. The
    command runs through the launcher (appliance/launcher.py): it dies with supervisord
    and carries this root's marker, so it never outlives its supervisor unnoticed.
    """
    return [
        log_directory(settings, settings.paths.log_dir / name),
        NoSymlink(service_log(settings, name)),
        Template(
            programs_dir(settings) / f"{name}.conf",
            "supervisor/program.conf.j2",
            {
                "name": name,
                "command": " ".join(
                    shlex.quote(part) for part in launched(settings, name, command)
                ).replace("%", "%%"),
                "user": user if settings.facts.run_as_root else None,
                "environment": quote_environment(environment or {}),
                "directory": str(directory) if directory else None,
                "stopsignal": stopsignal,
                "stopwaitsecs": stopwaitsecs,
                "umask": umask,
                "log_file": str(service_log(settings, name)),
                "max_bytes": settings.logging.max_bytes,
                "backups": settings.logging.backups,
            },
        ),
    ]


def launched(settings: Settings, name: str, command: list[str]) -> list[str]:
    """`command` behind the launcher: python without site (-S) or environment (-I)
    runs it in a few milliseconds."""
    return [
        executable("python"),
        "-I",
        "-S",
        str(Path(launcher.__file__).resolve()),
        str(settings.paths.supervisor_config),
        name,
        "--",
        *command,
    ]


def disabled(settings: Settings, name: str) -> list[Resource]:
    return [Absent(programs_dir(settings) / f"{name}.conf")]


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    p = settings.paths
    log_dir = p.log_dir / "supervisor"
    return [
        Directory(p.supervisor_dir, 0o700),
        Directory(programs_dir(settings), 0o755),
        log_directory(settings, log_dir),
        Template(
            p.supervisor_config,
            "supervisor/supervisord.conf.j2",
            {
                "socket": str(p.supervisor_socket),
                "pidfile": str(p.supervisor_dir / "supervisord.pid"),
                "log_dir": str(log_dir),
                "programs_dir": str(programs_dir(settings)),
                "max_bytes": settings.logging.max_bytes,
                "backups": settings.logging.backups,
                "run_as_root": settings.facts.run_as_root,
            },
        ),
    ]
