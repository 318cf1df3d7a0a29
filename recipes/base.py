"""What every service stands on: accounts, the directory tree, the secrets file."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from appliance.errors import ResourceError
from appliance.resources import Change, Directory, File, Resource
from appliance.secrets import Secrets
from appliance.settings import Settings


@dataclass
class Account(Resource):
    """A system account a service runs as; created, never modified or removed here."""

    username: str
    home: Path
    kind: ClassVar[str] = "account"

    @property
    def name(self) -> str:
        return self.username

    def current(self) -> bool:
        import pwd

        try:
            pwd.getpwnam(self.username)
            return True
        except KeyError:
            return False

    def plan(self, current: bool) -> list[Change]:
        return [] if current else [Change("create")]

    def apply(self) -> None:
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                str(self.home),
                "--shell",
                "/usr/sbin/nologin",
                self.username,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode not in (0, 9):  # 9: exists (created meanwhile)
            raise ResourceError(f"useradd {self.username} failed: {result.stderr.strip()}")


def service_user(settings: Settings, username: str) -> str | None:
    """The account a service runs as: its own when run as root, else whoever runs us."""
    return username if settings.facts.run_as_root else None


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    p = settings.paths
    out: list[Resource] = []
    if settings.facts.run_as_root and settings.manage_accounts:
        for username in (
            settings.registry.username,
            settings.auth.username,
            settings.web_server.username,
        ):
            out.append(Account(username, p.data_dir))
    out += [
        Directory(p.config_dir, 0o755),
        Directory(p.ssl_dir, 0o755),
        Directory(p.data_dir, 0o755),
        Directory(p.log_dir, 0o755),
        secrets_file(settings, secrets),
    ]
    return out


def secrets_file(settings: Settings, secrets: Secrets) -> File:
    """The secrets file, as reconfigure and a key rotation's steps write it."""
    return File(settings.paths.secrets_file, secrets.to_json(), 0o600, sensitive=True)
