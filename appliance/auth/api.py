"""The admin API under /api/v1/: a route table over appliance/auth/operations.py.

No framework: `ROUTES` lists every method and path with its operation, and the same
table generates the OpenAPI 3 document served at /api/v1/openapi.json, so the document
cannot describe a path the router does not serve. Path parameters are one URL segment
each, percent-decoded after the path is split: a repository or project name with a
slash is sent encoded (`/api/v1/repositories/team%2Fapp/tags`). The raw request line
(gunicorn's RAW_URI) is what is split, since PATH_INFO has %2F decoded already.

Every request but the OpenAPI document needs Basic authentication: a password, or a
personal access token with the `api` scope (operations.require_api_principal). Sign-in
goes through the token endpoint's Authenticator, so the failed sign-in rate limit
(429), blocked accounts and revoked tokens work the same; each request is one line of
the audit log. Basic only, no cookie: a cross-site page cannot make a browser send
these credentials, so the API needs no CSRF token (the pages' forms have theirs).

Errors are JSON `{"error": "forbidden", "message": "<one sentence>"}` with the status:
400 invalid, 401 not signed in, 403 forbidden, 404 not found, 405 wrong method, 409
conflict (exists already, still holds repositories, over quota, maintenance), 429 too
many failed sign-ins, 503 the registry does not answer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from appliance.auth import operations as ops
from appliance.auth.permissions import PERSONAL_TOKEN_SCOPES, ROLES, TOKEN_SCOPES, VISIBILITIES
from appliance.auth.signin import SignInRefused
from appliance.registry_api import RegistryAPIError

if TYPE_CHECKING:
    from appliance.auth.app import TokenService
    from appliance.auth.permissions import Principal

PREFIX = "/api/v1"
MAX_BODY_BYTES = 64 * 1024
StartResponse = Callable[..., object]
Handler = Callable[["ops.Context", "Principal", dict, dict], tuple[int, object]]

ERROR_WORDS = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    429: "too_many_requests",
    503: "unavailable",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "/projects/{project}" under PREFIX
    handler: Handler
    summary: str
    response: str  # a schema name of SCHEMAS, "[Name]" for a list, "" for 204
    body: str = ""  # the request body's schema name
    status: int = 200

    @property
    def parts(self) -> list[str]:
        return self.path.strip("/").split("/")


# ---------------------------------------------------------------- handlers


def _json(items: Iterable) -> list:
    return [item.to_json() for item in items]


def _int(value: str, what: str) -> int:
    if not value.isdigit():
        raise ops.Invalid(f"{what} '{value}' is not a number.")
    return int(value)


def _optional_bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ops.Invalid(f"'{name}' must be true or false.")
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ops.Invalid(f"'{name}' must be a string.")
    return value


def _me(ctx, principal, params, body):
    return 200, {"username": principal.name, "admin": principal.admin}


def _projects(ctx, principal, params, body):
    return 200, _json(ops.list_projects(ctx, principal))


def _project_create(ctx, principal, params, body):
    project = ops.create_project(
        ctx,
        principal,
        body.get("path"),
        body.get("visibility", "private"),
        _optional_bool(body, "registry_enabled"),
        _optional_str(body, "owner"),
    )
    return 201, project.to_json()


def _project(ctx, principal, params, body):
    return 200, ops.get_project(ctx, principal, params["project"]).to_json()


def _project_update(ctx, principal, params, body):
    quota = body.get("quota")
    project = ops.update_project(
        ctx,
        principal,
        params["project"],
        _optional_str(body, "visibility"),
        _optional_bool(body, "registry_enabled"),
        None if quota is None else str(quota),
    )
    return 200, project.to_json()


def _project_delete(ctx, principal, params, body):
    ops.delete_project(ctx, principal, params["project"])
    return 204, None


def _repositories(ctx, principal, params, body):
    return 200, _json(ops.list_repositories(ctx, principal, params["project"]))


def _usage(ctx, principal, params, body):
    return 200, ops.project_usage(ctx, principal, params["project"])


def _members(ctx, principal, params, body):
    return 200, _json(ops.list_members(ctx, principal, params["project"]))


def _member_set(ctx, principal, params, body):
    role = _optional_str(body, "role")
    if role is None:
        raise ops.Invalid(f"Give the member's role: one of {', '.join(ROLES)}.")
    ops.set_member(ctx, principal, params["project"], params["username"], role)
    return 200, {"username": params["username"], "role": role}


def _member_remove(ctx, principal, params, body):
    ops.remove_member(ctx, principal, params["project"], params["username"])
    return 204, None


def _deploy_tokens(ctx, principal, params, body):
    return 200, _json(ops.list_deploy_tokens(ctx, principal, params["project"]))


def _deploy_token_create(ctx, principal, params, body):
    token = ops.create_deploy_token(
        ctx,
        principal,
        params["project"],
        body.get("name"),
        body.get("scopes"),
        _optional_str(body, "expires"),
    )
    return 201, token.to_json()


def _deploy_token_revoke(ctx, principal, params, body):
    ops.revoke_deploy_token(ctx, principal, params["project"], _int(params["id"], "Token id"))
    return 204, None


def _repository_delete(ctx, principal, params, body):
    return 200, {"deleted": ops.delete_repository(ctx, principal, params["repository"])}


def _tags(ctx, principal, params, body):
    return 200, _json(ops.list_tags(ctx, principal, params["repository"]))


def _tag(ctx, principal, params, body):
    return 200, ops.get_tag(ctx, principal, params["repository"], params["tag"]).to_json()


def _tag_delete(ctx, principal, params, body):
    lines = ops.delete_tag(ctx, principal, params["repository"], params["tag"])
    return 200, {"deleted": lines}


def _users(ctx, principal, params, body):
    return 200, _json(ops.list_users(ctx, principal))


def _user_create(ctx, principal, params, body):
    user = ops.create_user(
        ctx,
        principal,
        body.get("username"),
        body.get("password"),
        bool(_optional_bool(body, "admin")),
    )
    return 201, user.to_json()


def _user_update(ctx, principal, params, body):
    blocked = _optional_bool(body, "blocked")
    password = body.get("password")
    if blocked is None and password is None:
        raise ops.Invalid("Nothing to change: give blocked or password.")
    if password is not None:
        ops.reset_password(ctx, principal, params["username"], password)
    if blocked is not None:
        ops.set_blocked(ctx, principal, params["username"], blocked)
    [user] = [u for u in ops.list_users(ctx, principal) if u.username == params["username"]]
    return 200, user.to_json()


def _user_delete(ctx, principal, params, body):
    ops.delete_user(ctx, principal, params["username"])
    return 204, None


def _tokens(ctx, principal, params, body):
    return 200, _json(ops.list_tokens(ctx, principal))


def _token_create(ctx, principal, params, body):
    token = ops.create_token(
        ctx, principal, body.get("name"), body.get("scopes"), _optional_str(body, "expires")
    )
    return 201, token.to_json()


def _token_revoke(ctx, principal, params, body):
    ops.revoke_token(ctx, principal, _int(params["id"], "Token id"))
    return 204, None


ROUTES: tuple[Route, ...] = (
    Route("GET", "/user", _me, "The signed-in user", "Me"),
    Route("GET", "/user/tokens", _tokens, "Your personal access tokens", "[Token]"),
    Route(
        "POST",
        "/user/tokens",
        _token_create,
        "Create a personal access token (its secret is in this answer only)",
        "Token",
        "TokenCreate",
        201,
    ),
    Route("DELETE", "/user/tokens/{id}", _token_revoke, "Revoke a personal access token", ""),
    Route("GET", "/projects", _projects, "The projects you can see", "[Project]"),
    Route(
        "POST",
        "/projects",
        _project_create,
        "Create a project (admins)",
        "Project",
        "ProjectCreate",
        201,
    ),
    Route("GET", "/projects/{project}", _project, "One project", "Project"),
    Route(
        "PATCH",
        "/projects/{project}",
        _project_update,
        "Change visibility, registry or quota (admins)",
        "Project",
        "ProjectUpdate",
    ),
    Route(
        "DELETE",
        "/projects/{project}",
        _project_delete,
        "Delete a project that holds no repositories (admins)",
        "",
    ),
    Route(
        "GET",
        "/projects/{project}/repositories",
        _repositories,
        "The project's repositories with their sizes",
        "[Repository]",
    ),
    Route("GET", "/projects/{project}/usage", _usage, "The project's storage use", "Usage"),
    Route("GET", "/projects/{project}/members", _members, "Members and roles", "[Member]"),
    Route(
        "PUT",
        "/projects/{project}/members/{username}",
        _member_set,
        "Add a member or change its role (owners)",
        "Member",
        "MemberRole",
    ),
    Route(
        "DELETE",
        "/projects/{project}/members/{username}",
        _member_remove,
        "Remove a member (owners)",
        "",
    ),
    Route(
        "GET",
        "/projects/{project}/deploy-tokens",
        _deploy_tokens,
        "Deploy tokens (maintainers)",
        "[Token]",
    ),
    Route(
        "POST",
        "/projects/{project}/deploy-tokens",
        _deploy_token_create,
        "Create a deploy token (maintainers; its password is in this answer only)",
        "Token",
        "DeployTokenCreate",
        201,
    ),
    Route(
        "DELETE",
        "/projects/{project}/deploy-tokens/{id}",
        _deploy_token_revoke,
        "Revoke a deploy token (maintainers)",
        "",
    ),
    Route(
        "DELETE",
        "/repositories/{repository}",
        _repository_delete,
        "Delete a repository with all its tags (maintainers)",
        "Deleted",
    ),
    Route("GET", "/repositories/{repository}/tags", _tags, "The repository's tags", "[Tag]"),
    Route("GET", "/repositories/{repository}/tags/{tag}", _tag, "One tag", "Tag"),
    Route(
        "DELETE",
        "/repositories/{repository}/tags/{tag}",
        _tag_delete,
        "Delete a tag (maintainers)",
        "Deleted",
    ),
    Route("GET", "/users", _users, "Every user (admins)", "[User]"),
    Route("POST", "/users", _user_create, "Create a user (admins)", "User", "UserCreate", 201),
    Route(
        "PATCH",
        "/users/{username}",
        _user_update,
        "Block, unblock or reset the password of a user (admins)",
        "User",
        "UserUpdate",
    ),
    Route("DELETE", "/users/{username}", _user_delete, "Delete a user (admins)", ""),
)


# ---------------------------------------------------------------- routing


def match(method: str, raw_path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for a request, its decoded path parameters, and (when the path exists
    under other methods only) the methods it allows."""
    segments = raw_path[len(PREFIX) :].strip("/").split("/")
    allowed: list[str] = []
    for route in ROUTES:
        parts = route.parts
        if len(parts) != len(segments):
            continue
        params: dict[str, str] = {}
        for part, segment in zip(parts, segments, strict=True):
            if part.startswith("{"):
                value = unquote(segment)
                if not value:
                    break
                params[part[1:-1]] = value
            elif part != segment:
                break
        else:
            if route.method == method:
                return route, params, []
            allowed.append(route.method)
    return None, {}, allowed


def raw_path(environ: dict) -> str:
    """The request's path still percent-encoded: gunicorn's RAW_URI (or REQUEST_URI),
    PATH_INFO when neither is there (then %2F cannot be told from /)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return urlsplit(raw).path
    return environ.get("PATH_INFO", "")


class AdminAPI:
    """The WSGI handler for PREFIX, mounted by TokenService."""

    def __init__(
        self,
        service: TokenService,
        context: Callable[[], ops.Context],
        basic: Callable[[dict], tuple[str, str] | None],
    ) -> None:
        """`basic` reads the Authorization header as the token endpoint does (raising
        SignInRefused on a malformed one)."""
        self.service = service
        self.context = context
        self.basic = basic
        self._openapi: bytes | None = None

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = raw_path(environ)
        if path == f"{PREFIX}/openapi.json" and method in ("GET", "HEAD"):
            if self._openapi is None:
                self._openapi = json.dumps(openapi(), indent=1).encode()
            return _send(start_response, 200, self._openapi)
        route, params, allowed = match(method, path)
        if route is None:
            if allowed:
                return _error(
                    start_response,
                    405,
                    f"Use {' or '.join(allowed)} on {path}.",
                    [("Allow", ", ".join(allowed))],
                )
            return _error(
                start_response, 404, f"There is no API path {path}; see {PREFIX}/openapi.json."
            )
        address = self.service.client_address(environ)
        record = {"client": address, "method": method, "api": path}
        now = time.time()
        try:
            credentials = self.basic(environ)
            if credentials is None:
                raise SignInRefused(401, "Sign in with Basic authentication.", "no credentials")
            signed_in = self.service.authenticator.sign_in(*credentials, address, now)
        except SignInRefused as refused:
            user = ""
            try:
                user = (self.basic(environ) or ("", ""))[0]
            except SignInRefused:
                pass
            self.service.audit.record(
                **record, user=user, result="denied", reason=refused.reason, status=refused.status
            )
            headers = [("WWW-Authenticate", f'Basic realm="{self.service.config.realm}"')]
            if refused.retry_after:
                headers.append(("Retry-After", str(refused.retry_after)))
            return _error(start_response, refused.status, refused.message, headers)
        principal = signed_in.principal
        record.update(user=principal.name, via=signed_in.via)
        try:
            ops.require_api_principal(principal)
            body = _body(environ) if route.body else {}
            status, payload = route.handler(self.context(), principal, params, body)
        except ops.OperationError as error:
            self.service.audit.record(
                **record, result="refused", reason=str(error), status=error.status
            )
            return _error(start_response, error.status, str(error))
        except RegistryAPIError as error:
            print(f"appliance-auth: api: {error}", flush=True)
            self.service.audit.record(**record, result="failed", reason=str(error), status=503)
            return _error(start_response, 503, f"The registry cannot answer now: {error}.")
        self.service.audit.record(**record, result="done", status=status)
        if status == 204:
            return _send(start_response, 204, b"")
        return _send(start_response, status, json.dumps(payload, separators=(",", ":")).encode())


def _body(environ: dict) -> dict:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ops.Invalid("Invalid Content-Length.") from None
    if length > MAX_BODY_BYTES:
        raise ops.Invalid(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    raw = environ["wsgi.input"].read(length) if length else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ops.Invalid(
            'The request body is not JSON; send an object like {"name": ...}.'
        ) from None
    if not isinstance(body, dict):
        raise ops.Invalid("The request body must be a JSON object.")
    return body


def _send(
    start_response: StartResponse,
    status: int,
    payload: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [
            *((("Content-Type", "application/json"),) if status != 204 else ()),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *(headers or ()),
        ],
    )
    return [payload]


def _error(
    start_response: StartResponse,
    status: int,
    message: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps({"error": ERROR_WORDS[status], "message": message}).encode()
    return _send(start_response, status, body, headers)


# ---------------------------------------------------------------- the OpenAPI document

_STRING, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_TIME = {"type": "number", "nullable": True, "description": "seconds since the epoch"}


def _object(properties: dict, required: Iterable[str] = ()) -> dict:
    schema: dict = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


SCHEMAS: dict[str, dict] = {
    "Error": _object({"error": _STRING, "message": _STRING}, ["error", "message"]),
    "Me": _object({"username": _STRING, "admin": _BOOL}),
    "Project": _object(
        {
            "path": _STRING,
            "visibility": {"type": "string", "enum": list(VISIBILITIES)},
            "registry_enabled": _BOOL,
            "created_at": _INT,
            "quota_bytes": {"type": "integer", "nullable": True},
            "used_bytes": {"type": "integer", "nullable": True},
            "role": {"type": "string", "enum": list(ROLES), "nullable": True},
            "can_delete": _BOOL,
        }
    ),
    "ProjectCreate": _object(
        {
            "path": _STRING,
            "visibility": {"type": "string", "enum": list(VISIBILITIES)},
            "registry_enabled": _BOOL,
            "owner": _STRING,
        },
        ["path"],
    ),
    "ProjectUpdate": _object(
        {
            "visibility": {"type": "string", "enum": list(VISIBILITIES)},
            "registry_enabled": _BOOL,
            "quota": {"type": "string", "description": "like 10GiB; 'none' removes it"},
        }
    ),
    "Repository": _object({"name": _STRING, "project": _STRING, "tags": _INT, "size": _INT}),
    "Tag": _object(
        {
            "repository": _STRING,
            "tag": _STRING,
            "digest": _STRING,
            "media_type": _STRING,
            "platforms": {"type": "array", "items": _STRING},
            "size": _INT,
            "created": {"type": "string", "nullable": True},
            "pushed_at": _TIME,
            "pushed_by": {"type": "string", "nullable": True},
            "last_pulled": _TIME,
            "manifests": {
                "type": "array",
                "description": "an index's platform manifests (empty for an image)",
                "items": _object({"platform": _STRING, "digest": _STRING, "size": _INT}),
            },
        }
    ),
    "Deleted": _object({"deleted": {"type": "array", "items": _STRING}}),
    "Usage": _object(
        {
            "project": _STRING,
            "used_bytes": {"type": "integer", "nullable": True},
            "quota_bytes": {"type": "integer", "nullable": True},
            "computed_at": _TIME,
        }
    ),
    "Member": _object({"username": _STRING, "role": {"type": "string", "enum": list(ROLES)}}),
    "MemberRole": _object({"role": {"type": "string", "enum": list(ROLES)}}, ["role"]),
    "Token": _object(
        {
            "id": _INT,
            "name": _STRING,
            "scopes": {"type": "array", "items": _STRING},
            "expires_at": {"type": "integer", "nullable": True},
            "created_at": _INT,
            "state": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "username": {"type": "string", "description": "a deploy token's sign-in name"},
            "secret": {"type": "string", "description": "only in the answer to a create"},
        }
    ),
    "TokenCreate": _object(
        {
            "name": _STRING,
            "scopes": {
                "type": "array",
                "items": {"type": "string", "enum": list(PERSONAL_TOKEN_SCOPES)},
            },
            "expires": {"type": "string", "format": "date", "description": "last valid day"},
        },
        ["name", "scopes"],
    ),
    "DeployTokenCreate": _object(
        {
            "name": _STRING,
            "scopes": {"type": "array", "items": {"type": "string", "enum": list(TOKEN_SCOPES)}},
            "expires": {"type": "string", "format": "date"},
        },
        ["name", "scopes"],
    ),
    "User": _object({"username": _STRING, "admin": _BOOL, "blocked": _BOOL, "created_at": _INT}),
    "UserCreate": _object(
        {"username": _STRING, "password": _STRING, "admin": _BOOL}, ["username", "password"]
    ),
    "UserUpdate": _object({"blocked": _BOOL, "password": _STRING}),
}

_PARAMETER_TEXT = {
    "project": "the project's path, URL-encoded (team%2Fapp)",
    "repository": "the repository's name, URL-encoded (team%2Fapp)",
    "tag": "the tag",
    "username": "the user's name",
    "id": "the token's id",
}


def _ref(name: str) -> dict:
    if name.startswith("["):
        return {"type": "array", "items": {"$ref": f"#/components/schemas/{name[1:-1]}"}}
    return {"$ref": f"#/components/schemas/{name}"}


def openapi() -> dict:
    """The OpenAPI 3.0 document, generated from ROUTES and SCHEMAS."""
    error = {"application/json": {"schema": _ref("Error")}}
    paths: dict[str, dict] = {}
    for route in ROUTES:
        operation: dict = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}{re.sub(r'[^A-Za-z]+', '_', route.path)}",
            "responses": {
                str(status): {"description": HTTPStatus(status).phrase, "content": error}
                for status in (400, 401, 403, 404, 409)
            },
        }
        if route.response:
            operation["responses"][str(route.status)] = {
                "description": HTTPStatus(route.status).phrase,
                "content": {"application/json": {"schema": _ref(route.response)}},
            }
        else:
            operation["responses"]["204"] = {"description": "Done"}
        names = [p[1:-1] for p in route.parts if p.startswith("{")]
        if names:
            operation["parameters"] = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": _PARAMETER_TEXT[name],
                    "schema": _INT if name == "id" else _STRING,
                }
                for name in names
            ]
        if route.body:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(route.body)}},
            }
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Appliance admin API",
            "version": "1",
            "description": "What the web pages and appliance-ctl offer, with the token "
            "service's permissions. Basic authentication: a password, or a personal "
            "access token with the api scope.",
        },
        "security": [{"basic": []}],
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "schemas": SCHEMAS,
        },
        "paths": paths,
    }
