"""The web interface: server-rendered pages of the auth service (plain WSGI, Jinja2).

Served on the registry's vhost behind nginx next to /v2/ and /jwt/auth, so it needs no
process or port of its own. Every page reads without JavaScript; the one small script
(static/app.js) only adds a copy button beside each `docker pull` field. Every change is
a POST form carrying a CSRF token (sessions.py), answered with a redirect to the page
that shows the result (post/redirect/get), except the token forms, whose answer shows
the new secret once.

Who may see and do what is decided by the permission rules the token service uses
(appliance/auth/permissions.py), through the operations the JSON API shares; this module
only turns requests into calls and results into HTML. Text from the database (a
description, a display name) reaches HTML through Jinja2's autoescaping only.
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from markupsafe import Markup

from appliance.auth import operations
from appliance.auth.audit import AuditLog
from appliance.auth.permissions import (
    DELETE,
    PERSONAL_TOKEN_SCOPES,
    ROLES,
    TOKEN_SCOPES,
    USER,
    VISIBILITIES,
    Principal,
)
from appliance.auth.signin import Authenticator, SignInRefused
from appliance.auth.sizes import format_size
from appliance.auth.store import Store, WebSession
from appliance.auth.usage import (
    FiguresFile,
    read_json,
)
from appliance.auth.web import sessions
from appliance.auth.web.chart import usage_chart
from appliance.errors import AuthError
from appliance.registry_api import RegistryAPIError

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
MAX_FORM_BYTES = 64 * 1024
StartResponse = Callable[..., object]
PROJECT = r"(?P<project>(?:(?!/-/)[^?#])+)"
REPOSITORY = r"(?P<repository>(?:(?!/-/)[^?#])+)"

SECURITY_HEADERS = [
    # Nothing but our own files: an injected <script> or <img onerror> would not run
    # even if escaping failed somewhere.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
]


class PageError(Exception):
    """A request the pages answer with an error page: status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Request:
    environ: dict
    method: str
    path: str
    query: dict[str, list[str]]
    cookies: dict[str, str]
    session: WebSession | None = None
    _form: dict[str, list[str]] | None = None

    @property
    def principal(self) -> Principal | None:
        if self.session is None:
            return None
        user = self.session.user
        return Principal(kind=USER, name=user.username, user_id=user.id, admin=user.admin)

    def form(self) -> dict[str, list[str]]:
        if self._form is None:
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError as error:
                raise PageError(400, "The request's Content-Length is not a number.") from error
            if length > MAX_FORM_BYTES:
                raise PageError(413, "The form is too large.")
            body = self.environ["wsgi.input"].read(length) if length > 0 else b""
            self._form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return self._form

    def field(self, name: str) -> str:
        values = self.form().get(name)
        return values[0] if values else ""

    def fields(self, name: str) -> list[str]:
        return self.form().get(name, [])


def url_of(kind: str, name: str, *rest: str) -> str:
    """The page of a project or repository (names hold '/': sub-pages follow '/-/', a
    component no project or repository name can have)."""
    base = f"/{kind}/{quote(name, safe='/')}"
    return base + ("/-/" + "/".join(quote(r, safe="") for r in rest) if rest else "")


def when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


class WebPages:
    """The pages as one WSGI application, mounted by the token service (app.py)."""

    def __init__(
        self,
        store: Store,
        authenticator: Authenticator,
        audit: AuditLog,
        client_address: Callable[[dict], str],
        registry_host: str,
        usage_figures: FiguresFile,
        gc_figures: FiguresFile,
        context: operations.Context,
    ) -> None:
        self.context = context
        self.store, self.authenticator, self.audit = store, authenticator, audit
        self.client_address = client_address
        self.registry_host = registry_host
        self.usage_figures, self.gc_figures = usage_figures, gc_figures
        self._environment = None
        self._routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = [
            ("GET", re.compile(r"/"), self.projects_page),
            ("GET", re.compile(r"/sign-in"), self.sign_in_page),
            ("POST", re.compile(r"/sign-in"), self.sign_in),
            ("POST", re.compile(r"/sign-out"), self.sign_out),
            ("GET", re.compile(r"/tokens"), self.tokens_page),
            ("POST", re.compile(r"/tokens"), self.token_create),
            ("POST", re.compile(r"/tokens/(?P<token_id>\d+)/revoke"), self.token_revoke),
            ("GET", re.compile(rf"/projects/{PROJECT}"), self.project_page),
            ("GET", re.compile(rf"/projects/{PROJECT}/-/members"), self.members_page),
            ("POST", re.compile(rf"/projects/{PROJECT}/-/members"), self.member_set),
            (
                "POST",
                re.compile(rf"/projects/{PROJECT}/-/members/(?P<username>[^/]+)/remove"),
                self.member_remove,
            ),
            (
                "GET",
                re.compile(rf"/projects/{PROJECT}/-/deploy-tokens"),
                self.deploy_tokens_page,
            ),
            (
                "POST",
                re.compile(rf"/projects/{PROJECT}/-/deploy-tokens"),
                self.deploy_token_create,
            ),
            (
                "POST",
                re.compile(rf"/projects/{PROJECT}/-/deploy-tokens/(?P<token_id>\d+)/revoke"),
                self.deploy_token_revoke,
            ),
            ("GET", re.compile(rf"/repositories/{REPOSITORY}"), self.repository_page),
            (
                "POST",
                re.compile(rf"/repositories/{REPOSITORY}/-/delete"),
                self.repository_delete,
            ),
            (
                "GET",
                re.compile(rf"/repositories/{REPOSITORY}/-/tags/(?P<tag>[^/]+)"),
                self.tag_page,
            ),
            (
                "POST",
                re.compile(rf"/repositories/{REPOSITORY}/-/tags/(?P<tag>[^/]+)/delete"),
                self.tag_delete,
            ),
            ("GET", re.compile(r"/admin/users"), self.admin_users_page),
            ("POST", re.compile(r"/admin/users"), self.admin_user_create),
            (
                "POST",
                re.compile(r"/admin/users/(?P<username>[^/]+)/(?P<action>block|unblock|password)"),
                self.admin_user_change,
            ),
            ("GET", re.compile(r"/admin/gc"), self.admin_gc_page),
            ("GET", re.compile(r"/admin/projects"), self.admin_projects_page),
            ("POST", re.compile(r"/admin/projects"), self.admin_project_create),
            (
                "POST",
                re.compile(rf"/admin/projects/{PROJECT}/-/(?P<action>description|delete)"),
                self.admin_project_change,
            ),
        ]

    # -- WSGI ---------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: StartResponse) -> list[bytes]:
        response = self.respond(environ)
        headers = [*response.headers]
        if not any(name == "Cache-Control" for name, _ in headers):
            headers.append(("Cache-Control", "no-store"))
        headers += SECURITY_HEADERS
        headers.append(("Content-Length", str(len(response.body))))
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        return [response.body]

    def respond(self, environ: dict) -> Response:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/static/"):
            return self.static(path.removeprefix("/static/"), environ)
        request = Request(
            environ=environ,
            method="GET" if method == "HEAD" else method,
            path=path,
            query=parse_qs(environ.get("QUERY_STRING", "")),
            cookies=sessions.read_cookies(environ.get("HTTP_COOKIE", "")),
        )
        try:
            handler, params = self._route(request)
            request.session = self._session(request)
            if request.method == "POST":
                self._check_form(request)
            if request.session is None and handler not in (self.sign_in_page, self.sign_in):
                return self._to_sign_in(request)
            return handler(request, **params)
        except PageError as error:
            return self.error_page(request, error.status, error.message)

    def _route(self, request: Request) -> tuple[Callable[..., Response], dict[str, str]]:
        path_known = False
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            path_known = True
            if method == request.method:
                return handler, match.groupdict()
        if path_known:
            raise PageError(405, f"{request.method} is not used on this page.")
        raise PageError(404, "There is no such page.")

    # -- sessions, CSRF ---------------------------------------------------------------
    def _session(self, request: Request) -> WebSession | None:
        secret = request.cookies.get(sessions.SESSION_COOKIE)
        if not secret:
            return None
        digest = sessions.digest(secret)
        session = self.store.find_web_session(digest)
        now = int(time.time())
        if session is None or not session.live(now):
            if session is not None:
                self.store.delete_web_session(digest)
            return None
        if now - session.seen_at >= sessions.TOUCH_EVERY:
            expires_at = sessions.expiry(session.created_at, now)
            self.store.touch_web_session(digest, now, expires_at)
        return session

    def _check_form(self, request: Request) -> None:
        """A POST counts only from this site and with the form's CSRF token: the
        session's, or before sign-in the sign-in cookie's. Anything else is 403."""
        why = sessions.cross_site(request.environ)
        expected = (
            request.session.csrf_token
            if request.session is not None
            else request.cookies.get(sessions.SIGN_IN_COOKIE)
        )
        if not why and not sessions.token_matches(request.field("csrf_token"), expected):
            why = "the form's CSRF token is missing or does not match"
        if why:
            self.audit.record(
                client=self.client_address(request.environ),
                method="POST",
                path=request.path,
                user=request.session.user.username if request.session else "",
                result="refused",
                reason=f"web form refused: {why}",
                status=403,
            )
            raise PageError(
                403,
                "This form was refused: it did not come from this site's own page (CSRF"
                " check). Reload the page and send the form again.",
            )

    def _to_sign_in(self, request: Request) -> Response:
        target = request.path if request.method == "GET" else "/"
        query = request.environ.get("QUERY_STRING", "")
        if query and request.method == "GET":
            target += "?" + query
        location = "/sign-in" if target == "/" else f"/sign-in?next={quote(target, safe='/')}"
        return Response(303, headers=[("Location", location)])

    def _notice(self, request: Request, text: str, location: str) -> Response:
        """Post/redirect/get: the next page shows `text` once."""
        if request.session is not None:
            self.store.set_web_session_notice(request.session.digest, text)
        return Response(303, headers=[("Location", location)])

    # -- rendering ---------------------------------------------------------------------
    @property
    def environment(self):  # jinja2.Environment, made on the first page
        if self._environment is None:
            import jinja2

            self._environment = jinja2.Environment(
                loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                autoescape=True,
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            self._environment.filters.update(size=format_size, when=when)
            self._environment.globals.update(url_of=url_of)
        return self._environment

    def render(self, request: Request, template: str, status: int = 200, **context) -> Response:
        session = request.session
        notice = None
        if session is not None and session.notice and request.method == "GET":
            notice = session.notice
            self.store.set_web_session_notice(session.digest, None)
        body = self.environment.get_template(template).render(
            session=session,
            user=session.user if session else None,
            display_name=session.display_name if session else "",
            csrf_token=session.csrf_token if session else context.pop("csrf_token", ""),
            notice=notice,
            path=request.path,
            **context,
        )
        return Response(status, body.encode(), [("Content-Type", "text/html; charset=utf-8")])

    def error_page(self, request: Request, status: int, message: str) -> Response:
        return self.render(request, "error.html", status, code=status, message=message)

    def static(self, name: str, environ: dict) -> Response:
        """The CSS and the script: files of this package, nothing from elsewhere."""
        if not re.fullmatch(r"[a-z0-9-]+\.(css|js|svg)", name) or not (STATIC / name).is_file():
            return Response(404, b"Not found.\n", [("Content-Type", "text/plain")])
        body = (STATIC / name).read_bytes()
        etag = f'"{sessions.digest(body.decode())[:16]}"'
        headers = [("ETag", etag), ("Cache-Control", "public, max-age=300")]
        if environ.get("HTTP_IF_NONE_MATCH") == etag:
            return Response(304, b"", headers)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(200, body, [("Content-Type", f"{kind}; charset=utf-8"), *headers])

    # -- sign-in, sign-out -------------------------------------------------------------
    def sign_in_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        if request.session is not None and not error:
            return Response(303, headers=[("Location", _safe_next(request))])
        token = request.cookies.get(sessions.SIGN_IN_COOKIE) or sessions.new_secret()
        response = self.render(
            request,
            "sign_in.html",
            status,
            csrf_token=token,
            error=error,
            next=_safe_next(request),
            username=request.field("username") if request.method == "POST" else "",
        )
        response.headers.append(
            (
                "Set-Cookie",
                sessions.cookie(sessions.SIGN_IN_COOKIE, token, sessions.SIGN_IN_COOKIE_SECONDS),
            )
        )
        return response

    def sign_in(self, request: Request) -> Response:
        """The docker login credentials, through the same authenticator (rate limit,
        blocked accounts) and audit log as the token endpoint. A personal access or
        deploy token is refused here: tokens are for clients and the API."""
        username, password = request.field("username").strip(), request.field("password")
        address = self.client_address(request.environ)
        now = time.time()
        record = {"client": address, "method": "POST", "path": "/sign-in", "user": username}
        try:
            signed_in = self.authenticator.sign_in(username, password, address, now)
            if signed_in.via != "password":
                raise SignInRefused(
                    401,
                    "Sign in with your password; tokens are for docker and the API.",
                    f"web sign-in with a {signed_in.via.replace('_', ' ')}",
                )
        except SignInRefused as refused:
            self.audit.record(
                **record, result="denied", reason=refused.reason, status=refused.status
            )
            status = 429 if refused.status == 429 else 400
            page = self.sign_in_page(request, error=refused.message, status=status)
            if refused.retry_after:
                page.headers.append(("Retry-After", str(refused.retry_after)))
            return page
        user = self.store.user(signed_in.principal.name)
        secret = sessions.new_secret()
        now_int = int(now)
        self.store.create_web_session(
            sessions.digest(secret),
            user,
            sessions.new_secret(),
            now_int,
            sessions.expiry(now_int, now_int),
            keep=sessions.SESSIONS_PER_USER,
        )
        self.audit.record(**record, via="password", result="signed in", status=303)
        return Response(
            303,
            headers=[
                ("Location", _safe_next(request)),
                (
                    "Set-Cookie",
                    sessions.cookie(sessions.SESSION_COOKIE, secret, sessions.MAX_SECONDS),
                ),
                ("Set-Cookie", sessions.cookie(sessions.SIGN_IN_COOKIE, "", 0)),
            ],
        )

    def sign_out(self, request: Request) -> Response:
        assert request.session is not None
        self.store.delete_web_session(request.session.digest)
        self.audit.record(
            client=self.client_address(request.environ),
            method="POST",
            path="/sign-out",
            user=request.session.user.username,
            result="signed out",
            status=303,
        )
        return Response(
            303,
            headers=[
                ("Location", "/sign-in"),
                ("Set-Cookie", sessions.cookie(sessions.SESSION_COOKIE, "", 0)),
            ],
        )

    # -- projects ----------------------------------------------------------------------
    # -- operations ---------------------------------------------------------------------
    def act(self, operation: Callable, request: Request, *args, **kwargs):
        """Run one of appliance/auth/operations.py's operations as the signed-in user (the
        one implementation the API shares); its refusal becomes the page's status and
        sentence, a registry that does not answer a 503."""
        principal = request.principal
        assert principal is not None
        try:
            return operation(self.context, principal, *args, **kwargs)
        except operations.OperationError as error:
            raise PageError(error.status, str(error)) from error
        except RegistryAPIError as error:
            raise PageError(503, f"The registry cannot be reached now: {error}.") from error

    def form_result(
        self, request: Request, again: Callable[..., Response], operation: Callable, *args
    ):
        """An operation sent by a form: (result, None), or (None, the form's page again
        with the refusal) for a refusal the user can fix (400, 409)."""
        try:
            return self.act(operation, request, *args), None
        except PageError as error:
            if error.status in (400, 409):
                return None, again(error=error.message)
            raise

    # -- projects ----------------------------------------------------------------------
    def projects_page(self, request: Request) -> Response:
        descriptions = self.store.project_descriptions()
        return self.render(
            request,
            "projects.html",
            projects=[
                {"project": view, "role": view.role, "description": descriptions.get(view.path, "")}
                for view in self.act(operations.list_projects, request)
            ],
        )

    def _project(self, request: Request, path: str) -> dict:
        view = self.act(operations.get_project, request, path)
        principal = request.principal
        assert principal is not None
        return {
            "project": view,
            "role": view.role or ("admin" if principal.admin else None),
            "description": self.store.project_descriptions().get(path, ""),
        }

    def project_page(self, request: Request, project: str) -> Response:
        info = self._project(request, project)
        try:
            repositories = self.act(operations.list_repositories, request, project)
            hidden = ""
        except PageError as error:
            if error.status not in (403, 409, 503):  # no pull here; no registry reachable
                raise
            repositories, hidden = [], error.message
        points = [tuple(p) for p in self.act(operations.project_usage, request, project)["history"]]
        return self.render(
            request,
            "project.html",
            repositories=repositories,
            hidden=hidden,
            usage=points,
            chart=Markup(
                usage_chart(
                    points, info["project"].quota_bytes, f"Storage used by {project} over time"
                )
            ),
            **info,
        )

    # -- repositories and tags ------------------------------------------------------------
    def _may_delete(self, request: Request, repository: str) -> bool:
        """Whether to show delete controls: the token service's own decision on `delete`
        (the operation decides again when the form is sent)."""
        principal = request.principal
        assert principal is not None
        return DELETE in self.context.decide(principal, repository, [DELETE]).granted

    def repository_page(self, request: Request, repository: str, error: str = "") -> Response:
        tags = self.act(operations.list_tags, request, repository)
        return self.render(
            request,
            "repository.html",
            400 if error else 200,
            repository=repository,
            project_path=self.store.project_path_of(repository),
            tags=tags,
            may_delete=self._may_delete(request, repository),
            host=self.registry_host,
            error=error,
        )

    def tag_page(self, request: Request, repository: str, tag: str) -> Response:
        row = self.act(operations.get_tag, request, repository, tag)
        return self.render(
            request,
            "tag.html",
            repository=repository,
            project_path=self.store.project_path_of(repository),
            row=row,
            may_delete=self._may_delete(request, repository),
            host=self.registry_host,
        )

    def tag_delete(self, request: Request, repository: str, tag: str) -> Response:
        lines, again = self.form_result(
            request,
            lambda error: self.repository_page(request, repository, error=error),
            operations.delete_tag,
            repository,
            tag,
        )
        if again is not None:
            return again
        self._audit_delete(request, f"tag {repository}:{tag}: {'; '.join(lines)}")
        return self._notice(
            request,
            f"Tag {tag} was deleted ({'; '.join(lines)}); its blobs stay on disk until the"
            " next garbage collection.",
            url_of("repositories", repository),
        )

    def repository_delete(self, request: Request, repository: str) -> Response:
        lines, again = self.form_result(
            request,
            lambda error: self.repository_page(request, repository, error=error),
            operations.delete_repository,
            repository,
        )
        if again is not None:
            return again
        self._audit_delete(request, f"repository {repository}: {'; '.join(lines)}")
        return self._notice(
            request, " ".join(lines), url_of("projects", self.store.project_path_of(repository))
        )

    def _audit_delete(self, request: Request, what: str) -> None:
        principal = request.principal
        assert principal is not None
        self.audit.record(
            client=self.client_address(request.environ),
            method="POST",
            path=request.path,
            user=principal.name,
            result="deleted",
            reason=f"web: {what}",
            status=303,
        )

    # -- members (owners) ----------------------------------------------------------------
    def members_page(self, request: Request, project: str, error: str = "") -> Response:
        info = self._project(request, project)
        names = self.store.display_names()
        members = [
            {"username": m.username, "role": m.role, "display_name": names.get(m.username, "")}
            for m in self.act(operations.list_members, request, project)
        ]
        return self.render(
            request,
            "members.html",
            400 if error else 200,
            members=members,
            roles=ROLES,
            may_manage=info["role"] in ("owner", "admin"),
            error=error,
            **info,
        )

    def member_set(self, request: Request, project: str) -> Response:
        username, role = request.field("username").strip(), request.field("role")
        _, again = self.form_result(
            request,
            lambda error: self.members_page(request, project, error=error),
            operations.set_member,
            project,
            username,
            role,
        )
        return again or self._notice(
            request,
            f"{username} is now {role} of {project}.",
            url_of("projects", project, "members"),
        )

    def member_remove(self, request: Request, project: str, username: str) -> Response:
        _, again = self.form_result(
            request,
            lambda error: self.members_page(request, project, error=error),
            operations.remove_member,
            project,
            username,
        )
        return again or self._notice(
            request,
            f"{username} is no longer a member of {project}.",
            url_of("projects", project, "members"),
        )

    # -- deploy tokens (maintainers) -----------------------------------------------------
    def deploy_tokens_page(
        self, request: Request, project: str, error: str = "", created: object = None
    ) -> Response:
        info = self._project(request, project)
        return self.render(
            request,
            "deploy_tokens.html",
            400 if error else 200,
            tokens=self.act(operations.list_deploy_tokens, request, project),
            scopes=TOKEN_SCOPES,
            error=error,
            created=created,
            **info,
        )

    def deploy_token_create(self, request: Request, project: str) -> Response:
        created, again = self.form_result(
            request,
            lambda error: self.deploy_tokens_page(request, project, error=error),
            operations.create_deploy_token,
            project,
            request.field("name"),
            request.fields("scopes"),
            request.field("expires") or None,
        )
        return again or self.deploy_tokens_page(request, project, created=created)

    def deploy_token_revoke(self, request: Request, project: str, token_id: str) -> Response:
        _, again = self.form_result(
            request,
            lambda error: self.deploy_tokens_page(request, project, error=error),
            operations.revoke_deploy_token,
            project,
            int(token_id),
        )
        return again or self._notice(
            request, "The deploy token was revoked.", url_of("projects", project, "deploy-tokens")
        )

    # -- personal access tokens ---------------------------------------------------------
    def tokens_page(self, request: Request, error: str = "", created: object = None) -> Response:
        return self.render(
            request,
            "tokens.html",
            400 if error else 200,
            tokens=self.act(operations.list_tokens, request),
            scopes=PERSONAL_TOKEN_SCOPES,
            error=error,
            created=created,
        )

    def token_create(self, request: Request) -> Response:
        created, again = self.form_result(
            request,
            lambda error: self.tokens_page(request, error=error),
            operations.create_token,
            request.field("name"),
            request.fields("scopes"),
            request.field("expires") or None,
        )
        return again or self.tokens_page(request, created=created)

    def token_revoke(self, request: Request, token_id: str) -> Response:
        _, again = self.form_result(
            request,
            lambda error: self.tokens_page(request, error=error),
            operations.revoke_token,
            int(token_id),
        )
        return again or self._notice(request, "The personal access token was revoked.", "/tokens")

    # -- administration ---------------------------------------------------------------
    def admin_users_page(self, request: Request, error: str = "") -> Response:
        return self.render(
            request,
            "admin_users.html",
            400 if error else 200,
            users=self.act(operations.list_users, request),
            display_names=self.store.display_names(),
            error=error,
        )

    def admin_user_create(self, request: Request) -> Response:
        username = request.field("username").strip()
        _, again = self.form_result(
            request,
            lambda error: self.admin_users_page(request, error=error),
            operations.create_user,
            username,
            request.field("password"),
            bool(request.field("admin")),
        )
        if again is not None:
            return again
        if request.field("display_name").strip():
            try:
                self.store.set_display_name(username, request.field("display_name"))
            except AuthError as error:
                return self.admin_users_page(request, error=f"User {username} was created; {error}")
        return self._notice(request, f"User {username} was created.", "/admin/users")

    def admin_user_change(self, request: Request, username: str, action: str) -> Response:
        if action == "password":
            operation, args = operations.reset_password, (username, request.field("password"))
            done = f"The password of {username} was changed; their sessions have ended."
        else:
            operation, args = operations.set_blocked, (username, action == "block")
            done = f"{username} was {action}ed."
        _, again = self.form_result(
            request, lambda error: self.admin_users_page(request, error=error), operation, *args
        )
        return again or self._notice(request, done, "/admin/users")

    def admin_gc_page(self, request: Request) -> Response:
        self.act(operations.list_users, request)  # administrators only
        # The janitor (retention policies, then a collection) keeps its last run beside
        # the collection's figures, in the same data directory (settings.paths).
        janitor = read_json(self.gc_figures.path.with_name("janitor.json")) or {}
        return self.render(
            request,
            "admin_gc.html",
            stats=self.gc_figures.read(),
            janitor_last=janitor.get("last") if isinstance(janitor.get("last"), dict) else None,
            janitor_next=janitor.get("next"),
        )

    def admin_projects_page(self, request: Request, error: str = "") -> Response:
        self.act(operations.list_users, request)  # administrators only
        return self.render(
            request,
            "admin_projects.html",
            400 if error else 200,
            projects=self.act(operations.list_projects, request),
            descriptions=self.store.project_descriptions(),
            visibilities=VISIBILITIES,
            error=error,
        )

    def admin_project_create(self, request: Request) -> Response:
        path = request.field("path").strip()
        _, again = self.form_result(
            request,
            lambda error: self.admin_projects_page(request, error=error),
            operations.create_project,
            path,
            request.field("visibility"),
        )
        if again is not None:
            return again
        if request.field("description").strip():
            try:
                self.store.set_project_description(path, request.field("description"))
            except AuthError as error:
                return self.admin_projects_page(request, error=f"{path} was created; {error}")
        return self._notice(request, f"Project {path} was created.", "/admin/projects")

    def admin_project_change(self, request: Request, project: str, action: str) -> Response:
        if action == "delete":
            _, again = self.form_result(
                request,
                lambda error: self.admin_projects_page(request, error=error),
                operations.delete_project,
                project,
            )
            return again or self._notice(
                request, f"Project {project} was deleted.", "/admin/projects"
            )
        # The description is the pages' own free text: an administrator's to set.
        self.act(operations.list_users, request)  # administrators only
        try:
            self.store.set_project_description(project, request.field("description"))
        except AuthError as error:
            return self.admin_projects_page(request, error=str(error))
        return self._notice(request, f"The description of {project} was saved.", "/admin/projects")


def _safe_next(request: Request) -> str:
    """Where to go after sign-in: a path of this site only (no //host, no scheme)."""
    target = (request.query.get("next") or [""])[0]
    if not target and request.method == "POST":
        target = request.field("next")
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith("//") or parts.scheme or parts.netloc:
        return "/"
    if "\\" in target or any(ord(c) < 32 for c in target):
        return "/"
    return target
