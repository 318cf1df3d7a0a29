"""The token endpoint as a plain WSGI application (no framework: every microsecond here is
paid once per registry request).

  GET  /jwt/auth   Basic auth or anonymous; ?service=&scope=...&account=&offline_token=
  POST /jwt/auth   OAuth2 form: grant_type=password | refresh_token
  GET  /-/health   200 when the database answers
  PUT|DELETE /v2/<name>/manifests/<reference>
                   the tag rules, asked by nginx before a manifest write reaches the
                   registry: 460 passes it on, 403 refuses it (appliance/auth/tag_gate.py)

and on the internal listener (auth.internal_addr, loopback TCP; nothing else there):

  POST /-/registry-events   the registry's notifications (Authorization: Bearer SECRET)
  GET  /metrics             Prometheus metrics (storage usage, quotas, GC, history)
  GET  /-/health

Grants are the intersection of what was asked and what is allowed; a partial or empty
grant is still 200 (the registry then refuses the action). Bad credentials are 401, too
many failures 429. A request to push into a project over its quota is refused whole
with the sentence (permissions.push_blocked), which the client prints: 401, see
REFUSAL_STATUS.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from appliance.auth import events as registry_events
from appliance.auth import metrics, operations
from appliance.auth.api import AdminAPI
from appliance.auth.audit import AuditLog
from appliance.auth.config import AuthConfig
from appliance.auth.names import is_repository_name
from appliance.auth.permissions import (
    ALL,
    PUSH,
    WRITE_ACTIONS,
    Decision,
    Principal,
    ProjectAccess,
    decide,
    decide_catalog,
    maintenance_refusal,
)
from appliance.auth.signin import ANONYMOUS, Authenticator, SignedIn, SignInRefused
from appliance.auth.store import Store
from appliance.auth.tag_gate import MANIFEST_PATH, TagGate
from appliance.auth.tag_rules import ADMIN, PASSED, RANKS
from appliance.auth.tokens import TokenSigner, TokenVerifier, rfc3339
from appliance.auth.usage import (
    FiguresFile,
    current,
    history_file,
    project_bytes,
    read_history,
)
from appliance.auth.web.pages import WebPages
from appliance.registry_api import SERVICE_SUBJECT, RegistryAPI, RegistryAPIError
from appliance.registry_content import RegistryContentOverAPI
from appliance.registry_maintenance import STALE, Watch, state

StartResponse = Callable[..., object]
MAX_FORM_BYTES = 64 * 1024
MAX_EVENTS_BYTES = 1024 * 1024
REFUSAL_STATUS = 401
"""The status of a token request refused whole (Decision.refusal: over quota). Measured
with the clients here: skopeo 1.9 (containers/image) prints the body's message only for
a 401 from the token realm ("unable to retrieve auth token: invalid username/password:
denied: <sentence>"); for a 403 it prints "invalid status code from registry 403
(Forbidden)" and nothing of the reason. docker prints `denied: <sentence>` for either."""
MAX_CLIENT_ID = 200
"""Characters of an offline login's client_id (docker sends "docker"): it is stored with
the refresh token, so its length is bounded like everything a client can make us keep."""


class BadRequest(Exception):
    def __init__(self, message: str, oauth_error: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.oauth_error = message, oauth_error


class TokenService:
    def __init__(
        self,
        config: AuthConfig,
        store: Store | None = None,
        signer: TokenSigner | None = None,
    ) -> None:
        self.config = config
        self.store = store or Store(config.database)
        self.signer = signer or TokenSigner(
            config.signing_key,
            config.signing_certificate,
            config.issuer,
            config.service,
            config.token_lifetime,
        )
        self.authenticator = Authenticator(self.store, config)
        self.audit = AuditLog(
            config.audit_log, config.audit_log_max_bytes, config.audit_log_backups
        )
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        # On a unix socket the directory lets nginx's account alone connect.
        self._peers_are_proxy = config.listen_socket is not None
        self._proxy_verdicts: dict[str, bool] = {}
        self.usage_figures = FiguresFile(config.usage_file)
        self.gc_figures = FiguresFile(config.gc_stats_file)
        self._internal = (ipaddress.ip_address(config.internal_host), config.internal_port)
        self.tag_gate = TagGate(
            self.store,
            TokenVerifier(config.signing_certificate, config.issuer, config.service),
            RegistryAPI(config.registry_address, self.signer, timeout=10, subject=SERVICE_SUBJECT)
            if config.registry_address
            else None,
            config.default_registry_enabled,
            self.maintenance_refusal,
        )
        self.maintenance = Watch(config.maintenance_file)
        self._pages: WebPages | None = None
        self._operations: operations.Context | None = None
        self.admin_api = AdminAPI(self, self.operations_context, _basic_credentials)

    def operations_context(self) -> operations.Context:
        """What the admin API and the pages act through (appliance/auth/operations.py):
        this service's store and repository decision, and the registry's content through
        its API (the service's account cannot read the storage). Made on first use, so a
        worker answering only token requests never builds it."""
        if self._operations is None:
            content = None
            if self.config.registry_address:
                api = RegistryAPI(
                    self.config.registry_address, self.signer, timeout=30, subject=SERVICE_SUBJECT
                )
                content = RegistryContentOverAPI(
                    api, self.store.manifest_changes, self.store.last_event_id
                )

            def open_content() -> RegistryContentOverAPI:
                if content is None:
                    raise RegistryAPIError("the auth service has no registry address configured")
                return content

            self._operations = operations.Context(
                store=self.store,
                decide=self.decide_repository,
                content=open_content,
                default_registry_enabled=self.config.default_registry_enabled,
                usage_figures=self.usage_figures.read,
                usage_history=lambda: read_history(history_file(self.config.usage_file)),
                tag_delete_refusal=self.tag_delete_refusal,
            )
        return self._operations

    # -- WSGI entry point -------------------------------------------------------------
    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if self.on_internal_listener(environ):
            return self._internal_request(environ, start_response, path, method)
        if path == "/jwt/auth":
            if method in ("GET", "HEAD"):
                return self._token(environ, start_response, _query(environ), post=False)
            if method == "POST":
                try:
                    form = _form(environ)
                except BadRequest as error:
                    return _respond(
                        start_response, 400, _error_body(error.message, "invalid_request")
                    )
                return self._token(environ, start_response, form, post=True)
            return _respond(
                start_response,
                405,
                _error_body("Use GET or POST.", "invalid_request"),
                [("Allow", "GET, POST")],
            )
        if path.startswith("/v2/"):
            return self._tag_rules(environ, start_response)
        if path.startswith("/api/"):
            return self.admin_api(environ, start_response)
        if path == "/-/health":
            return self._health(start_response)
        return self.pages(environ, start_response)

    def tag_delete_refusal(self, principal: Principal, repository: str, tag: str | None) -> str:
        """Why the tag rules refuse deleting `tag` (None: every tag of the repository)
        for `principal`; '' when they allow it. The same verdict the tag gate gives a
        client's manifest DELETE: by digest, so a manifest an immutable or protected tag
        points at is refused whichever tag names it."""
        registry = self.tag_gate.registry
        if registry is None:
            return ""
        access = self.store.project_access(
            repository,
            principal.user_id,
            principal.name if principal.user_id else None,
            self.config.default_registry_enabled,
        )
        if principal.admin:
            rank = RANKS[ADMIN]
        else:
            rank = RANKS.get((access.role if access else None) or "", -1)
        tags = [tag] if tag is not None else registry.tags(repository)
        for name in tags:
            digest = registry.digest(repository, name)
            if digest is None:
                continue
            verdict = self.tag_gate.check_delete(repository, digest, rank)
            if not verdict.allowed:
                return verdict.message
        return ""

    @property
    def pages(self) -> WebPages:
        """The web interface (appliance/auth/web), made on its first request: a token
        request never pays for loading the templates."""
        if self._pages is None:
            self._pages = WebPages(
                self.store,
                self.authenticator,
                self.audit,
                self.client_address,
                urlsplit(self.config.realm).netloc,
                self.usage_figures,
                self.gc_figures,
                self.operations_context(),
            )
        return self._pages

    def _not_found(self, start_response: StartResponse) -> Iterable[bytes]:
        return _respond(start_response, 404, _error_body("Not found.", "invalid_request"))

    def _health(self, start_response: StartResponse) -> Iterable[bytes]:
        try:
            self.store.ping()
        except Exception as error:  # noqa: BLE001 - any failure means unhealthy
            # nginx serves this to anyone: the reason (a path, a database error) goes
            # to the service's log, the answer is the bare status.
            print(f"appliance-auth: unhealthy: {error}", file=sys.stderr, flush=True)
            return _respond(start_response, 503, {"status": "unhealthy"})
        return _respond(start_response, 200, {"status": "ok"})

    # -- the internal listener: the registry's events, metrics --------------------------
    def on_internal_listener(self, environ: dict) -> bool:
        """Did the request come in on auth.internal_addr? Decided by the listening socket
        gunicorn accepted it on, never by a header."""
        connection = environ.get("gunicorn.socket")
        if connection is None:
            return bool(environ.get("appliance.internal"))  # tests calling the app directly
        try:
            local = connection.getsockname()
        except OSError:
            return False
        if not isinstance(local, tuple) or local[1] != self._internal[1]:
            return False  # the unix socket (nginx's), or listen_addr's port
        try:
            return (ipaddress.ip_address(local[0]), local[1]) == self._internal
        except ValueError:
            return False

    def _internal_request(
        self, environ: dict, start_response: StartResponse, path: str, method: str
    ) -> Iterable[bytes]:
        if path == "/-/registry-events" and method == "POST":
            return self._registry_events(environ, start_response)
        if path == "/metrics" and method in ("GET", "HEAD"):
            body = self.metrics()
            start_response(
                "200 OK",
                [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(body)))],
            )
            return [body]
        if path == "/-/health":
            return self._health(start_response)
        return self._not_found(start_response)

    def _registry_events(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Record the registry's manifest events (history) and the blobs pushes bring
        (usage until the next computation). 401 without the secret; the registry sends
        an envelope again until it gets a 2xx, so a failure here is retried."""
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, secret = header.partition(" ")
        digest = hashlib.sha256(secret.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            digest, self.config.events_secret_digest
        ):
            return _respond(start_response, 401, _error_body("Unknown sender.", "invalid_client"))
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_EVENTS_BYTES:
            return _respond(
                start_response, 400, _error_body("Send one envelope of events.", "invalid_request")
            )
        try:
            envelope = registry_events.parse(environ["wsgi.input"].read(length))
        except registry_events.BadEnvelope as error:
            return _respond(start_response, 400, _error_body(str(error), "invalid_request"))
        self.store.record_events(envelope.manifests)
        if envelope.pushed_blobs:
            self.store.add_pending_usage(
                (
                    (self.store.project_path_of(repository), digest, size)
                    for repository, digest, size, _ in envelope.pushed_blobs
                ),
                time.time(),
            )
            figures = self.usage_figures.read()
            if figures:
                self.store.forget_pending_usage(float(figures.get("computed_at", 0)))
        start_response("204 No Content", [])
        return []

    def metrics(self) -> bytes:
        figures = self.usage_figures.read()
        since = float((figures or {}).get("computed_at", 0.0))
        usage = current(figures, self.store.pending_usage(since))
        return metrics.render(
            usage, self.store.quotas(), self.gc_figures.read(), self.store.event_counts()
        )

    def _with_use(self, project: ProjectAccess | None, actions: list[str]) -> ProjectAccess | None:
        """The project with its use filled in, when a quota may block what is asked."""
        if project is None or project.quota_bytes is None:
            return project
        if PUSH not in actions and ALL not in actions:
            return project
        figures = self.usage_figures.read()
        since = float((figures or {}).get("computed_at", 0.0))
        used = project_bytes(figures, self.store.pending_usage(since), project.path)
        return dataclasses.replace(project, used_bytes=used)

    # -- manifest writes, before the registry -----------------------------------------
    def _tag_rules(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        answer = self.tag_gate.decide(environ)
        if answer.status == PASSED:
            start_response(f"{PASSED} Tag Rules Passed", [("Content-Length", "0")])
            return [b""]
        self.audit.record(
            client=self.client_address(environ),
            method=environ.get("REQUEST_METHOD"),
            path=environ.get("PATH_INFO", ""),
            user=answer.user,
            result="refused",
            reason=answer.message,
            status=answer.status,
        )
        body = {"errors": [{"code": answer.code, "message": answer.message, "detail": None}]}
        headers = []
        if answer.status == 403:
            # RFC 6750's answer to a token that does not allow the request. oras-py reads a
            # 403 without a challenge as an authentication failure and drops the message;
            # with one it asks again, is refused again and prints the message.
            match = MANIFEST_PATH.fullmatch(environ.get("PATH_INFO", ""))
            scope = f"repository:{match['name']}:pull,push" if match else ""
            headers.append(
                (
                    "WWW-Authenticate",
                    f'Bearer realm="{self.config.realm}",service="{self.config.service}",'
                    f'scope="{scope}",error="insufficient_scope"',
                )
            )
        return _respond(start_response, answer.status, body, headers)

    # -- token requests ---------------------------------------------------------------
    def _token(
        self, environ: dict, start_response: StartResponse, params: dict, post: bool
    ) -> Iterable[bytes]:
        now = time.time()
        address = self.client_address(environ)
        scopes = [s for value in params.get("scope", ()) for s in value.split()]
        record = {"client": address, "method": environ.get("REQUEST_METHOD"), "requested": scopes}
        try:
            service = _single(params, "service")
            if service is not None and service != self.config.service:
                raise BadRequest(
                    f"Unknown service '{service}'; this server issues tokens for"
                    f" '{self.config.service}'."
                )
            client_id = _single(params, "client_id")
            if client_id is not None and len(client_id) > MAX_CLIENT_ID:
                raise BadRequest(
                    f"The client_id is {len(client_id)} characters long; use at most"
                    f" {MAX_CLIENT_ID}."
                )
            signed_in, want_refresh = self._sign_in(environ, params, post, address, now)
        except SignInRefused as refused:
            user = _single(params, "username") or _basic_user(environ) or ""
            self.audit.record(
                **record,
                user=user,
                granted=[],
                result="denied",
                reason=refused.reason,
                status=refused.status,
            )
            headers = [("WWW-Authenticate", f'Basic realm="{self.config.realm}"')]
            if refused.retry_after:
                headers.append(("Retry-After", str(refused.retry_after)))
            code = "TOOMANYREQUESTS" if refused.status == 429 else "UNAUTHORIZED"
            body = _error_body(refused.message, "invalid_grant", code)
            return _respond(start_response, refused.status, body, headers)
        except BadRequest as error:
            return self._bad_request(environ, start_response, record, error, address, now)

        access, reasons, refusals = self.grant(signed_in, scopes)
        if refusals:
            message = "; ".join(refusals)
            self.audit.record(
                **record,
                user=signed_in.principal.name,
                via=signed_in.via,
                granted=[],
                result="refused",
                reason=message,
                status=REFUSAL_STATUS,
            )
            headers = [("WWW-Authenticate", f'Basic realm="{self.config.realm}"')]
            body = _error_body(message, "access_denied")
            return _respond(start_response, REFUSAL_STATUS, body, headers)
        issued = self.signer.issue(signed_in.principal.name, access, now)
        body = {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": rfc3339(issued.issued_at),
        }
        if want_refresh:
            body["refresh_token"] = self.authenticator.issue_refresh_token(
                signed_in, client_id, now
            )
        if post:
            body["scope"] = " ".join(_scope_strings(access))
        self.audit.record(
            **record,
            user=signed_in.principal.name,
            via=signed_in.via,
            granted=_scope_strings(access),
            result="granted" if not reasons else ("partial" if access else "refused"),
            reason="; ".join(reasons),
            status=200,
        )
        return _respond(start_response, 200, body)

    def _bad_request(
        self,
        environ: dict,
        start_response: StartResponse,
        record: dict,
        error: BadRequest,
        address: str,
        now: float,
    ) -> Iterable[bytes]:
        """400, counted against the address like a failed sign-in (429 past its limit):
        a malformed request is a failure path too, and each one costs an audit line."""
        status, message, reason, retry_after = 400, error.message, error.message, 0
        try:
            self.authenticator.check_rate(None, address, now)
            self.authenticator.failed(None, address, now)
        except SignInRefused as refused:
            status, message, reason = refused.status, refused.message, refused.reason
            retry_after = refused.retry_after
        self.audit.record(
            **record,
            user=_basic_user(environ) or "",
            granted=[],
            result="denied",
            reason=reason,
            status=status,
        )
        if status == 429:
            body = _error_body(message, "invalid_request", "TOOMANYREQUESTS")
            return _respond(start_response, 429, body, [("Retry-After", str(retry_after))])
        return _respond(start_response, 400, _error_body(message, error.oauth_error))

    def _sign_in(
        self, environ: dict, params: dict, post: bool, address: str, now: float
    ) -> tuple[SignedIn, bool]:
        """Who is asking, and whether to issue a refresh token."""
        if post:
            grant_type = _single(params, "grant_type")
            if grant_type == "password":
                signed_in = self.authenticator.sign_in(
                    _single(params, "username") or "",
                    _single(params, "password") or "",
                    address,
                    now,
                )
                return signed_in, _single(params, "access_type") == "offline"
            if grant_type == "refresh_token":
                secret = _single(params, "refresh_token") or ""
                return self.authenticator.refresh(secret, address, now), False
            raise BadRequest(
                f"Unsupported grant_type '{grant_type}'; use password or refresh_token.",
                "unsupported_grant_type",
            )
        try:
            credentials = _basic_credentials(environ)
        except SignInRefused:  # malformed credentials: a failure, counted per address
            self.authenticator.check_rate(None, address, now)
            self.authenticator.failed(None, address, now)
            raise
        if credentials is None:
            return ANONYMOUS, False
        signed_in = self.authenticator.sign_in(*credentials, address, now)
        return signed_in, _single(params, "offline_token") == "true"

    def maintenance_refusal(self, actions: list[str], now: float) -> str:
        """While the registry serves read-only (a garbage collection's window), a push or
        delete is refused with the sentence the client prints; pulls go on. One stat of
        the marker file per request."""
        if not WRITE_ACTIONS & set(actions):
            return ""  # a pull never waits for a window, nor asks the database about one
        window = self.maintenance.window()
        if window is None or state(window) == STALE:
            # Several nodes (auth.database_url): a window opened on any of them, one
            # query; nothing on SQLite.
            window = self.store.shared_maintenance_window()
        if window is None:
            return ""
        return maintenance_refusal(actions, window.reason, window.expected_end, now)

    def grant(
        self, signed_in: SignedIn, scopes: list[str]
    ) -> tuple[list[dict], list[str], list[str]]:
        """The token's `access` claim for the requested scopes, why anything was refused,
        and the refusals that answer the whole request (Decision.refusal, REFUSAL_STATUS)."""
        merged: dict[tuple[str, str], list[str]] = {}
        reasons: list[str] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                reasons.append(f"{scope}: malformed scope")
                continue
            key = (parts[0], ":".join(parts[1:-1]))
            merged.setdefault(key, []).extend(a for a in parts[-1].split(",") if a)
        principal = signed_in.principal
        access = []
        refusals: list[str] = []
        for (kind, name), actions in merged.items():
            if kind == "repository":
                decision = self.decide_repository(principal, name, actions)
            elif kind == "registry" and name == "catalog":
                decision = decide_catalog(principal, actions)
            else:
                decision = Decision((), f"resource type '{kind}' is not supported")
            if decision.refusal:
                refusals.append(decision.refusal)
            if decision.reason:
                reasons.append(f"{kind}:{name}:{','.join(actions)}: {decision.reason}")
            if decision.granted:
                access.append({"type": kind, "name": name, "actions": list(decision.granted)})
        return access, reasons, refusals

    def decide_repository(self, principal: Principal, name: str, actions: list[str]) -> Decision:
        """The decision on one repository scope: what `grant` puts in a token, and what
        `appliance-ctl why` replays (appliance/auth/why.py) to explain it. Every rule that
        grants or refuses a repository action belongs here or in `permissions.decide`, so
        the token and the explanation cannot disagree."""
        if not is_repository_name(name):
            return Decision((), "not a valid repository name")
        # A maintenance window (a garbage collection) refuses pushes and deletes before
        # anything is looked up, whoever asks; the whole request is refused with it, as a
        # quota's refusal is (REFUSAL_STATUS).
        refusal = self.maintenance_refusal(actions, time.time())
        if refusal:
            return Decision((), refusal, refusal=refusal)
        project = self.store.project_access(
            name,
            principal.user_id,
            principal.name if principal.user_id else None,
            self.config.default_registry_enabled,
        )
        return decide(principal, self._with_use(project, actions), actions)

    def client_address(self, environ: dict) -> str:
        peer = environ.get("REMOTE_ADDR", "")
        forwarded = environ.get("HTTP_X_REAL_IP")
        if forwarded and (self._peers_are_proxy or self._is_trusted_proxy(peer)):
            return forwarded.strip()
        return peer

    def _is_trusted_proxy(self, peer: str) -> bool:
        verdict = self._proxy_verdicts.get(peer)
        if verdict is None:
            try:
                address = ipaddress.ip_address(peer)
                verdict = any(address in network for network in self._proxies)
            except ValueError:
                verdict = False
            if len(self._proxy_verdicts) < 1024:
                self._proxy_verdicts[peer] = verdict
        return verdict


def _query(environ: dict) -> dict[str, list[str]]:
    return parse_qs(environ.get("QUERY_STRING", ""))


def _form(environ: dict) -> dict[str, list[str]]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError as error:
        raise BadRequest("Invalid Content-Length.") from error
    if length > MAX_FORM_BYTES:
        raise BadRequest("The form is too large.")
    body = environ["wsgi.input"].read(length) if length else b""
    form = parse_qs(body.decode("utf-8", "replace"))
    for key, values in _query(environ).items():  # service/scope may come in the URL too
        form.setdefault(key, values)
    return form


def _single(params: dict, name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _basic_credentials(environ: dict) -> tuple[str, str] | None:
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise SignInRefused(401, "Use Basic authentication.", f"unsupported scheme {scheme}")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as error:
        raise SignInRefused(401, "Malformed Basic credentials.", "malformed basic") from error
    username, sep, password = decoded.partition(":")
    if not sep:
        raise SignInRefused(401, "Malformed Basic credentials.", "malformed basic")
    return username, password


def _basic_user(environ: dict) -> str | None:
    try:
        credentials = _basic_credentials(environ)
    except SignInRefused:
        return None
    return credentials[0] if credentials else None


def _scope_strings(access: list[dict]) -> list[str]:
    return [f"{a['type']}:{a['name']}:{','.join(a['actions'])}" for a in access]


def _error_body(message: str, oauth_error: str, code: str = "DENIED") -> dict:
    # Both shapes: distribution clients read `errors`, OAuth2 clients `error_description`.
    return {
        "errors": [{"code": code, "message": message}],
        "error": oauth_error,
        "error_description": message,
        "details": message,
    }


def _respond(
    start_response: StartResponse,
    status: int,
    body: dict,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    payload = json.dumps(body, separators=(",", ":")).encode()
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            *(headers or ()),
        ],
    )
    return [payload]
