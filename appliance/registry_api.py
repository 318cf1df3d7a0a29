"""The registry's HTTP API, spoken by the appliance itself (as an admin).

Commands that change content through the registry (a manifest deleted by
`--delete-untagged`, `tag delete`, `repo delete`) go to the registry's own address
(`registry.http_addr` or its unix socket), not through nginx: no TLS, no name to
resolve, and nothing for a client-facing limit to refuse. Each request carries a token
the appliance signs itself with the token-signing key, for exactly the repository and
actions it needs, valid for a minute; the registry checks it as it checks any other.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from appliance.errors import ApplianceError

if TYPE_CHECKING:  # the auth service asks the registry too: no import cycle with it
    from appliance.auth.tokens import TokenSigner

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
)
SUBJECT = "appliance-ctl"
SERVICE_SUBJECT = "appliance-auth"
"""The subject of the auth service's own requests (the tag gate's HEADs, the admin API's
and the pages' listings)."""
OWN_SUBJECTS = frozenset({SUBJECT, SERVICE_SUBJECT})
"""The appliance's own readers: their manifest reads are not pulls (events.parse)."""


class RegistryAPIError(ApplianceError):
    """The registry refused or did not answer; the sentence says what to check."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        try:
            return json.loads(self.body)
        except ValueError:
            return {}


class RegistryAPI:
    def __init__(
        self, address: str, signer: TokenSigner, timeout: float = 30, subject: str = SUBJECT
    ) -> None:
        self.address = address
        self.subject = subject
        self.signer = signer
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith("/"):
            return _UnixConnection(self.address, self.timeout)
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return http.client.HTTPConnection(host, int(port), timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        access: list[dict],
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        token = self.signer.issue(self.subject, access, time.time()).token
        connection = self._connection()
        try:
            connection.request(
                method,
                path,
                body=body,
                headers={"Authorization": f"Bearer {token}", "Host": "registry", **(headers or {})},
            )
            response = connection.getresponse()
            return Response(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        except OSError as error:
            raise RegistryAPIError(
                f"the registry does not answer on {self.address} ({error}); see "
                f"appliance-ctl status registry."
            ) from error
        finally:
            connection.close()

    @staticmethod
    def _repository(name: str, *actions: str) -> list[dict]:
        return [{"type": "repository", "name": name, "actions": list(actions)}]

    def _fail(self, what: str, response: Response) -> RegistryAPIError:
        errors = response.json().get("errors") or [{}]
        detail = errors[0].get("message") or response.body[:200].decode("utf-8", "replace")
        return RegistryAPIError(f"the registry refused to {what}: {response.status} {detail}")

    def catalog(self) -> list[str]:
        """Every repository name (the catalog, page by page)."""
        names: list[str] = []
        path = "/v2/_catalog?n=1000"
        access = [{"type": "registry", "name": "catalog", "actions": ["*"]}]
        while True:
            response = self.request("GET", path, access)
            if response.status != 200:
                raise self._fail("list its repositories", response)
            names += response.json().get("repositories") or []
            link = response.headers.get("link", "")
            if not link.startswith("<"):
                return names
            path = link[1 : link.index(">")]

    def tags(self, repository: str) -> list[str]:
        response = self.request(
            "GET", f"/v2/{repository}/tags/list", self._repository(repository, "pull")
        )
        if response.status == 404:
            return []
        if response.status != 200:
            raise self._fail(f"list the tags of {repository}", response)
        return sorted(response.json().get("tags") or [])

    def manifest(self, repository: str, reference: str) -> Response | None:
        """The manifest as stored (its digest in docker-content-digest); None when it is
        not there."""
        response = self.request(
            "GET",
            f"/v2/{repository}/manifests/{quote(reference, safe=':')}",
            self._repository(repository, "pull"),
            {"Accept": MANIFEST_TYPES},
        )
        if response.status == 404:
            return None
        if response.status != 200:
            raise self._fail(f"read {repository}:{reference}", response)
        return response

    def digest(self, repository: str, reference: str) -> str | None:
        """The digest `reference` (a tag) points at now, from a HEAD; None when there is
        no such tag."""
        response = self.request(
            "HEAD",
            f"/v2/{repository}/manifests/{quote(reference, safe=':')}",
            self._repository(repository, "pull"),
            {"Accept": MANIFEST_TYPES},
        )
        if response.status == 404:
            return None
        digest = response.headers.get("docker-content-digest")
        if response.status != 200 or not digest:
            raise RegistryAPIError(
                f"the registry did not give the digest of {repository}:{reference}"
                f" ({response.status})"
            )
        return digest

    def delete_manifest(self, repository: str, digest: str) -> bool:
        """Delete a manifest by digest (every tag on it goes too); False if it was gone."""
        return self._delete(repository, f"/v2/{repository}/manifests/{digest}", digest)

    def delete_blob(self, repository: str, digest: str) -> bool:
        """Unlink a blob from `repository` (its data stays for the garbage collection to
        free); the registry forgets it in its blob descriptor cache too, so a later push
        to a repository of that name uploads it again instead of trusting a stale entry.
        False if the repository did not hold it."""
        return self._delete(repository, f"/v2/{repository}/blobs/{digest}", digest)

    def _delete(self, repository: str, path: str, digest: str) -> bool:
        response = self.request("DELETE", path, self._repository(repository, "delete"))
        if response.status in (202, 200):
            return True
        if response.status == 404:
            return False
        if response.status == 405:
            raise RegistryAPIError(
                f"the registry refuses deletes ({repository}@{digest}); set "
                f"registry.storage_delete_enabled: true (or storage.delete.enabled) and run "
                f"appliance-ctl reconfigure, or wait for the maintenance window to end."
            )
        raise self._fail(f"delete {repository}@{digest}", response)

    def upload_blob(self, repository: str, data: bytes) -> str:
        """Upload a blob in one PUT (POST opens the session, PUT closes it with the
        digest); its digest. What `appliance-ctl check` pushes."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        access = self._repository(repository, "pull", "push")
        response = self.request("POST", f"/v2/{repository}/blobs/uploads/", access)
        if response.status != 202 or "location" not in response.headers:
            raise self._fail(f"start an upload to {repository}", response)
        location = urlsplit(response.headers["location"])
        separator = "&" if location.query else ""
        path = f"{location.path}?{location.query}{separator}digest={quote(digest, safe=':')}"
        response = self.request(
            "PUT", path, access, {"Content-Type": "application/octet-stream"}, data
        )
        if response.status != 201:
            raise self._fail(f"finish an upload to {repository}", response)
        return digest

    def put_manifest(self, repository: str, tag: str, media_type: str, body: bytes) -> str:
        """Store a manifest under a tag; the digest the registry gives it."""
        response = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{quote(tag, safe='')}",
            self._repository(repository, "pull", "push"),
            {"Content-Type": media_type},
            body,
        )
        if response.status != 201:
            raise self._fail(f"store a manifest in {repository}:{tag}", response)
        return response.headers.get("docker-content-digest", "")

    def blob(self, repository: str, digest: str) -> bytes | None:
        """A blob's bytes (None when the repository does not hold it)."""
        response = self.request(
            "GET", f"/v2/{repository}/blobs/{digest}", self._repository(repository, "pull")
        )
        if response.status == 404:
            return None
        if response.status in (302, 303, 307) and "location" in response.headers:
            return _fetch_redirect(response.headers["location"], self.timeout)
        if response.status != 200:
            raise self._fail(f"read {repository}@{digest}", response)
        return response.body


def _fetch_redirect(url: str, timeout: float) -> bytes:
    """A blob the registry sends to its storage's own URL (s3 without redirect.disable),
    fetched there without the registry's token, as a client would."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - the registry's URL
            return reply.read()
    except (OSError, urllib.error.URLError) as error:
        raise RegistryAPIError(
            f"the registry redirects blob reads to {urlsplit(url).netloc}, which did not "
            f"answer ({error}); clients need to reach it too, or set "
            f"registry.storage.redirect.disable: true."
        ) from error
