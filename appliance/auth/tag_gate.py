"""The tag rules, enforced in front of the registry: nginx hands every manifest PUT and
DELETE (`/v2/<name>/manifests/<reference>`) to the auth service first, with its body,
and sends it on to the registry only when the service answers PASSED (460).

Why not nginx's `auth_request`: its subrequest carries no request body (the module
gives it an empty one on purpose), so it cannot know the digest of the manifest being
pushed, and re-pushing the same digest (CI retrying) must pass while another digest is
refused. nginx instead proxies the write here (bodies of manifests are small, read
whole), intercepts the PASSED status and sends the same request, body included, to the
registry from a named location; a refusal (403, an OCI error body) reaches the client
as it is (README, "Immutable and protected tags").

What a write costs here: one query for the project's rules; with none, nothing else.
A rule that matches the tag costs the token's verification, and an immutable one the
body's SHA-256 and, unless the reservation already holds that digest, one HEAD of the
tag on the registry's own address (the registry is the truth about what a tag points
at; the reservation table only orders pushes that are in flight).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.auth import tag_rules
from appliance.auth.names import is_repository_name
from appliance.auth.store import Store
from appliance.auth.tag_rules import PASSED, RANKS, Verdict
from appliance.auth.tokens import TokenVerifier
from appliance.registry_api import RegistryAPI, RegistryAPIError

MANIFEST_PATH = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""The registry's own limit on a manifest; nginx reads a manifest into memory of this
size (a larger body would go to a temporary file, which nginx closes after the first
upstream), so a larger one is refused here."""
NO_RANK = -1


@dataclass(frozen=True)
class Answer:
    status: int
    message: str = ""
    code: str = ""
    user: str = ""
    """The token's subject, when one was read (for the audit log)."""


PASS = Answer(PASSED)


class TagGate:
    def __init__(
        self,
        store: Store,
        verifier: TokenVerifier,
        registry: RegistryAPI | None,
        default_registry_enabled: bool,
        maintenance: Callable[[list[str], float], str] | None = None,
    ) -> None:
        self.store, self.verifier, self.registry = store, verifier, registry
        self.default_registry_enabled = default_registry_enabled
        self.maintenance = maintenance
        """The maintenance window's refusal for these actions, or "" (TokenService)."""

    def decide(self, environ: dict) -> Answer:
        method = environ.get("REQUEST_METHOD", "")
        match = MANIFEST_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if method not in ("PUT", "DELETE") or match is None:
            return PASS  # not a manifest write: the registry decides alone
        repository, reference = match["name"], match["reference"]
        if _content_length(environ) > MAX_MANIFEST_BYTES:
            return Answer(
                413,
                f"the manifest is larger than {MAX_MANIFEST_BYTES // 1024 // 1024} MiB,"
                " the registry's limit",
                "SIZE_INVALID",
            )
        if not is_repository_name(repository):
            return PASS  # the registry refuses the name itself
        if self.maintenance is not None:
            # A token issued before a window opened still carries push: refused here on
            # every node, whose own registry may still be read-write (a window opened on
            # another node of a cluster) while that node's collector runs.
            refusal = self.maintenance(["push" if method == "PUT" else "delete"], time.time())
            if refusal:
                return Answer(403, refusal, "DENIED")
        project = self.store.project_access(repository, None, None, self.default_registry_enabled)
        if project is None or project.project_id is None:
            return PASS
        rules = self.store.tag_rules(project.project_id)
        if not rules:
            return PASS
        if method == "PUT" and not (
            tag_rules.is_tag(reference) and any(rule.matches(reference) for rule in rules)
        ):
            # No rule on this tag, or a manifest pushed by digest (an index's child, which
            # moves no tag): nothing to know about who pushes what.
            return PASS
        now = time.time()
        found = self._rank(environ, repository, method, now)
        if found is None:
            return PASS  # no token the registry would take: it answers 401 itself
        rank, user = found
        try:
            if method == "PUT":
                verdict = self._push(environ, rules, repository, reference, rank, now)
            else:
                verdict = self._delete(rules, repository, reference, rank)
        except RegistryAPIError as error:
            print(
                f"appliance-auth: tag rules of {repository}: {error}", file=sys.stderr, flush=True
            )
            return Answer(
                503,
                f"the tag rules of {repository} cannot be checked now (the registry does not"
                " answer the auth service); try again",
                "UNAVAILABLE",
                user,
            )
        if verdict.allowed:
            return PASS
        return Answer(403, verdict.message, "DENIED", user)

    def check_delete(self, repository: str, reference: str, rank: int) -> Verdict:
        """The tag rules' verdict on deleting `reference` in `repository` for a requester
        of `rank`, for deletes that do not pass through nginx (the web interface and
        the API): the same decision as a client's DELETE gets here."""
        project = self.store.project_access(repository, None, None, self.default_registry_enabled)
        if project is None or project.project_id is None:
            return tag_rules.ALLOW
        rules = self.store.tag_rules(project.project_id)
        if not rules:
            return tag_rules.ALLOW
        return self._delete(rules, repository, reference, rank)

    def _rank(
        self, environ: dict, repository: str, method: str, now: float
    ) -> tuple[int, str] | None:
        """The requester's rank on `repository` and name, from its verified token (None
        when the token would not let the registry accept this write anyway)."""
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        claims = self.verifier.claims(token.strip(), now)
        if claims is None:
            return None
        needed = {"push"} if method == "PUT" else {"delete", "*"}
        granted = any(
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and entry.get("name") == repository
            and needed & set(entry.get("actions") or ())
            for entry in claims.get("access") or ()
        )
        if not granted:
            return None
        subject = str(claims.get("sub", ""))
        deploy = self.store.find_deploy_token(subject) if subject.startswith("appliance+") else None
        if deploy is not None:
            return tag_rules.DEPLOY_TOKEN_RANK, subject
        user = self.store.find_user(subject) if subject else None
        if user is None:
            return NO_RANK, subject
        if user.admin:
            return RANKS[tag_rules.ADMIN], subject
        access = self.store.project_access(
            repository, user.id, user.username, self.default_registry_enabled
        )
        return (RANKS.get(access.role or "", NO_RANK) if access else NO_RANK), subject

    def _push(
        self,
        environ: dict,
        rules: list[tag_rules.TagRule],
        repository: str,
        tag: str,
        rank: int,
        now: float,
    ) -> Verdict:
        if not tag_rules.relevant(rules, tag, rank):
            return tag_rules.ALLOW
        if tag_rules.immutability(rules, tag) is None:  # protected only: who, not what
            return tag_rules.decide_push(rules, repository, tag, "", rank, None, None, now)
        digest = _body_digest(environ)
        if digest is None:
            return tag_rules.ALLOW  # too large for a manifest: the registry refuses it
        reservation = self.store.reservation(repository, tag)
        if reservation is not None and reservation.digest == digest:
            # The same manifest again (a retry, CI's idempotent re-push), unless a rule
            # on who may push says otherwise.
            return tag_rules.decide_push(rules, repository, tag, digest, rank, digest, None, now)
        current = self._registry().digest(repository, tag)
        if current is not None:
            self.store.record_tag(repository, tag, current, now)
        verdict = tag_rules.decide_push(
            rules, repository, tag, digest, rank, current, reservation, now
        )
        if verdict.reserve and not self.store.reserve_tag(
            repository, tag, digest, now, reservation
        ):
            # Another first push of this tag reserved it a moment ago: exactly one wins.
            held = self.store.reservation(repository, tag)
            return tag_rules.decide_push(rules, repository, tag, digest, rank, None, held, now)
        return verdict

    def _delete(
        self, rules: list[tag_rules.TagRule], repository: str, reference: str, rank: int
    ) -> Verdict:
        registry = self._registry()
        if tag_rules.is_digest(reference):
            candidates = [
                tag for tag in registry.tags(repository) if tag_rules.relevant(rules, tag, rank)
            ]
        else:
            candidates = [reference] if tag_rules.relevant(rules, reference, rank) else []
        tags = {}
        for tag in candidates:
            pointed = _pointed_at(registry, repository, tag)
            if pointed:
                tags[tag] = pointed
        return tag_rules.decide_delete(rules, repository, reference, rank, tags)

    def _registry(self) -> RegistryAPI:
        if self.registry is None:
            raise RegistryAPIError("the auth service has no registry address configured")
        return self.registry


def _pointed_at(registry: RegistryAPI, repository: str, tag: str) -> tuple[str, ...]:
    """The digest `tag` points at, then those of an image index's platform manifests
    (deleting one of them breaks the index); () when there is no such tag."""
    response = registry.manifest(repository, tag)
    if response is None:
        return ()
    digest = response.headers.get("docker-content-digest", "")
    document = response.json()
    listed = document.get("manifests") if isinstance(document, dict) else None
    children = [
        entry["digest"]
        for entry in (listed if isinstance(listed, list) else ())
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str)
    ]
    return (digest, *children)


def _content_length(environ: dict) -> int:
    try:
        return int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


def _body_digest(environ: dict) -> str | None:
    length = _content_length(environ)
    if length > MAX_MANIFEST_BYTES:
        return None
    body = environ["wsgi.input"].read(length) if length else b""
    return "sha256:" + hashlib.sha256(body).hexdigest()
