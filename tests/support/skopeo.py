"""skopeo, the real registry client of the integration tests, run isolated.

As root skopeo would share a blob cache under /var/lib/containers and credentials under
~/.config/containers with everything else on the host; pointing HOME, XDG_* and
`_CONTAINERS_ROOTLESS_UID` into a private directory keeps each test's client state its
own (DESIGN.md, interop facts).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.oci import OciImage, OciIndex, read_image


class SkopeoError(Exception):
    def __init__(self, args: list[str], result: subprocess.CompletedProcess) -> None:
        super().__init__(f"skopeo {' '.join(args)} exited {result.returncode}: {result.stderr}")
        self.returncode = result.returncode
        self.stderr = result.stderr


@dataclass
class Skopeo:
    """A skopeo client for one registry address (`host:port`).

    `cert_dir` holds the CA that signed the registry's certificate (`ca.crt`); without
    one, TLS verification is off (plain HTTP or a test's throwaway certificate).
    """

    home: Path
    registry: str
    username: str | None = None
    password: str | None = None
    cert_dir: Path | None = None
    timeout: float = 300

    def environment(self) -> dict[str, str]:
        home = self.home
        for sub in ("config", "cache", "data", "run"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "run").chmod(0o700)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "REGISTRY_AUTH_FILE": str(home / "config" / "auth.json"),
            # Makes containers/image treat us as rootless: blob cache under XDG_*.
            "_CONTAINERS_ROOTLESS_UID": str(os.getuid() or 1),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """Run skopeo; a non-zero exit raises SkopeoError carrying its stderr."""
        argv = ["skopeo", "--insecure-policy", *args]
        result = subprocess.run(
            argv,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        if result.returncode != 0:
            raise SkopeoError(list(args), result)
        return result

    def _tls(self, side: str) -> list[str]:
        if self.cert_dir is not None:
            return [f"--{side}cert-dir={self.cert_dir}"]
        return [f"--{side}tls-verify=false"]

    def _creds(self, side: str) -> list[str]:
        if self.username is None:
            return [f"--{side}no-creds"]
        return [f"--{side}creds={self.username}:{self.password}"]

    def url(self, repository: str, tag: str | None = None) -> str:
        """The docker:// reference of `repository[:tag]` on this registry."""
        return f"docker://{self.registry}/{repository}" + (f":{tag}" if tag else "")

    def push(self, image: OciImage, repository: str, tag: str | None = None) -> None:
        self.run(
            "copy",
            "--quiet",
            *self._tls("dest-"),
            *self._creds("dest-"),
            image.reference,
            self.url(repository, tag or image.tag),
        )

    def push_all(self, index: OciIndex, repository: str, tag: str | None = None) -> None:
        """Push a multi-platform index with every platform's image (`copy --all`)."""
        self.run(
            "copy",
            "--quiet",
            "--all",
            *self._tls("dest-"),
            *self._creds("dest-"),
            index.reference,
            self.url(repository, tag or index.tag),
        )

    def pull_all(self, repository: str, tag: str, layout: Path) -> None:
        """Copy an index with every platform's image; fails if one of them is gone."""
        self.run(
            "copy",
            "--quiet",
            "--all",
            *self._tls("src-"),
            *self._creds("src-"),
            self.url(repository, tag),
            f"oci:{layout}:{tag}",
        )

    def pull(self, repository: str, tag: str, layout: Path) -> OciImage:
        """Copy `repository:tag` into an OCI layout and return it with verified digests."""
        self.copy_to_layout(repository, tag, layout)
        return read_image(layout, tag)

    def copy_to_layout(self, repository: str, tag: str, layout: Path) -> None:
        """Only skopeo's copy, unchecked: what a benchmark times."""
        self.run(
            "copy",
            "--quiet",
            *self._tls("src-"),
            *self._creds("src-"),
            self.url(repository, tag),
            f"oci:{layout}:{tag}",
        )

    def list_tags(self, repository: str) -> list[str]:
        result = self.run("list-tags", *self._tls(""), *self._creds(""), self.url(repository))
        return json.loads(result.stdout)["Tags"]

    def inspect(self, repository: str, tag: str) -> dict:
        """The raw manifest, whose digest is what the registry stores."""
        result = self.run(
            "inspect", "--raw", *self._tls(""), *self._creds(""), self.url(repository, tag)
        )
        return json.loads(result.stdout)

    def digest(self, repository: str, tag: str) -> str:
        result = self.run("inspect", *self._tls(""), *self._creds(""), self.url(repository, tag))
        return json.loads(result.stdout)["Digest"]

    def delete(self, repository: str, tag: str) -> None:
        self.run("delete", *self._tls(""), *self._creds(""), self.url(repository, tag))
