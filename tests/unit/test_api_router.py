"""The admin API at the WSGI level: routing, authentication, statuses, the OpenAPI
document, and the permission matrix (the API's answers equal the token endpoint's
grants, one table). The registry's content is a storage laid out as Distribution lays
it out (tests/appliance/test_api.py runs the API through nginx on a real registry)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from openapi_spec_validator import validate

from appliance.auth import api as api_module
from appliance.auth import credentials
from appliance.auth import operations as ops
from appliance.auth.app import TokenService
from appliance.auth.store import Store
from appliance.registry_content import RegistryContent
from appliance.registry_storage import FilesystemStorage
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import make_config
from tests.unit.test_operations import FakeAPI
from tests.unit.test_registry_storage import Layout

PASSWORD = "correct horse"
ROLE_USERS = ("outsider", "guest", "reporter", "developer", "maintainer", "owner", "root")


@dataclass
class Answer:
    status: int
    headers: dict
    body: object


def request(service, method: str, raw: str, basic=None, body=None, headers=None) -> Answer:
    data = json.dumps(body).encode() if body is not None else b""
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": raw.split("?")[0],  # what a server decodes: %2F becomes /
        "RAW_URI": raw,
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(data)),
        "CONTENT_TYPE": "application/json",
        "wsgi.input": io.BytesIO(data),
    }
    if basic:
        encoded = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        environ["HTTP_AUTHORIZATION"] = f"Basic {encoded}"
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured = {}

    def start_response(status: str, response_headers: list) -> None:
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(response_headers)

    payload = b"".join(service(environ, start_response))
    return Answer(captured["status"], captured["headers"], json.loads(payload) if payload else None)


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path / "auth", rate_limit_user_failures=3)
    store = Store(config.database)
    for name in ROLE_USERS:
        store.create_user(name, credentials.hash_password(PASSWORD), admin=name == "root")
    for visibility in ("private", "internal", "public"):
        store.create_project(f"{visibility}/app", visibility, True)
        for role in ("guest", "reporter", "developer", "maintainer", "owner"):
            store.add_member(f"{visibility}/app", role, role)
    service = TokenService(config, store)
    layout = Layout(tmp_path / "storage")
    for visibility in ("private", "internal", "public"):
        layout.image(f"{visibility}/app", [visibility.encode()], tag="v1")
    fake = FakeAPI(layout)
    service._operations = ops.Context(
        store=store,
        decide=service.decide_repository,
        content=lambda: RegistryContent(
            FilesystemStorage(layout.root), lambda: fake, tmp_path / "lock"
        ),
        usage_figures=service.usage_figures.read,
    )
    return service, layout


def audit(service) -> list[dict]:
    return [json.loads(line) for line in service.config.audit_log.read_text().splitlines()]


def test_the_openapi_document_is_valid_and_names_every_route(world) -> None:
    service, _ = world
    answer = request(service, "GET", "/api/v1/openapi.json")
    assert answer.status == 200
    validate(answer.body)
    served = {(r.method.lower(), "/api/v1" + r.path) for r in api_module.ROUTES}
    documented = {(m, p) for p, ms in answer.body["paths"].items() for m in ms}
    assert served == documented
    for path in ("/api/v1/projects", "/api/v1/repositories/{repository}/tags/{tag}"):
        assert path in answer.body["paths"]


def test_without_or_with_bad_credentials_401_and_the_rate_limit_applies(world) -> None:
    service, _ = world
    answer = request(service, "GET", "/api/v1/projects")
    assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
    assert answer.body["error"] == "unauthorized"
    statuses = [
        request(service, "GET", "/api/v1/projects", ("reporter", "wrong")).status for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]
    # the limit holds for the right password too, as at the token endpoint
    assert request(service, "GET", "/api/v1/projects", ("reporter", PASSWORD)).status == 429
    lines = audit(service)
    assert lines[-1]["api"] == "/api/v1/projects" and lines[-1]["status"] == 429


def test_names_with_slashes_are_sent_encoded(world) -> None:
    service, _ = world
    me = ("reporter", PASSWORD)
    tags = request(service, "GET", "/api/v1/repositories/private%2Fapp/tags", me)
    assert tags.status == 200 and [t["tag"] for t in tags.body] == ["v1"]
    assert tags.body[0]["digest"].startswith("sha256:")
    one = request(service, "GET", "/api/v1/repositories/private%2Fapp/tags/v1", me)
    assert one.status == 200 and one.body["tag"] == "v1"
    repos = request(service, "GET", "/api/v1/projects/private%2Fapp/repositories", me)
    assert [r["name"] for r in repos.body] == ["private/app"] and repos.body[0]["size"] > 0
    unencoded = request(service, "GET", "/api/v1/repositories/private/app/tags", me)
    assert unencoded.status == 404 and "openapi.json" in unencoded.body["message"]


def test_statuses_for_wrong_method_bad_body_conflicts_and_missing_things(world) -> None:
    service, _ = world
    root = ("root", PASSWORD)
    wrong = request(service, "PUT", "/api/v1/projects", root)
    assert wrong.status == 405 and wrong.headers["Allow"] == "GET, POST"
    environ_body = request(service, "POST", "/api/v1/users", root, body=["not", "an object"])
    assert environ_body.status == 400 and "JSON object" in environ_body.body["message"]
    created = request(
        service, "POST", "/api/v1/users", root, body={"username": "dave", "password": "long pw x"}
    )
    assert created.status == 201 and created.body["username"] == "dave"
    again = request(
        service, "POST", "/api/v1/users", root, body={"username": "dave", "password": "long pw x"}
    )
    assert again.status == 409 and again.body["message"] == "A user named 'dave' exists already."
    short = request(
        service, "POST", "/api/v1/users", root, body={"username": "erin", "password": "x"}
    )
    assert short.status == 400 and "too short" in short.body["message"]
    assert request(service, "GET", "/api/v1/users", ("owner", PASSWORD)).status == 403
    missing = request(service, "GET", "/api/v1/repositories/private%2Fapp/tags/nope", root)
    assert (
        missing.status == 404
        and missing.body["message"] == "Repository private/app has no tag nope."
    )
    blocked = request(service, "PATCH", "/api/v1/users/dave", root, body={"blocked": True})
    assert blocked.status == 200 and blocked.body["blocked"] is True
    assert request(service, "GET", "/api/v1/user", ("dave", "long pw x")).status == 401


def test_a_personal_access_token_needs_the_api_scope_and_a_deploy_token_is_refused(world) -> None:
    service, _ = world
    me = ("maintainer", PASSWORD)
    made = request(
        service, "POST", "/api/v1/user/tokens", me, body={"name": "ci", "scopes": ["api"]}
    )
    assert made.status == 201 and made.body["secret"].startswith("apat_")
    read_only = request(
        service,
        "POST",
        "/api/v1/user/tokens",
        me,
        body={"name": "pull", "scopes": ["read_registry"]},
    )
    with_api = ("maintainer", made.body["secret"])
    without = ("maintainer", read_only.body["secret"])
    assert request(service, "GET", "/api/v1/projects", with_api).status == 200
    refused = request(service, "GET", "/api/v1/projects", without)
    assert refused.status == 403 and "no 'api' scope" in refused.body["message"]
    listed = request(service, "GET", "/api/v1/user/tokens", with_api)
    assert [t["name"] for t in listed.body] == ["ci", "pull"]
    assert all("secret" not in t for t in listed.body)
    deploy = request(
        service,
        "POST",
        "/api/v1/projects/private%2Fapp/deploy-tokens",
        me,
        body={"name": "robot", "scopes": ["read_registry"]},
    )
    assert deploy.status == 201
    robot = (deploy.body["username"], deploy.body["secret"])
    assert request(service, "GET", "/api/v1/projects", robot).status == 403
    revoked = request(service, "DELETE", f"/api/v1/user/tokens/{made.body['id']}", me)
    assert revoked.status == 204
    assert request(service, "GET", "/api/v1/projects", with_api).status == 401


MATRIX = [
    (user, visibility, action)
    for user in ROLE_USERS
    for visibility in ("private", "internal", "public")
    for action in ("pull", "delete")
]


@pytest.mark.parametrize(("user", "visibility", "action"), MATRIX)
def test_the_api_answers_as_the_token_endpoint_grants(world, user, visibility, action) -> None:
    """One table for both: the token endpoint's grant for repository:<v>/app:<action>
    decides the API's answer to the same user (pull: GET the tags; delete: DELETE a tag).
    Without pull a repository is not found (its name is not told); with pull but not
    delete, 403."""
    service, _ = world
    repository = f"{visibility}/app"
    token = call(
        service, query=token_query(f"repository:{repository}:{action}"), basic=(user, PASSWORD)
    )
    claims = jwt.decode(token.body["token"], options={"verify_signature": False})
    granted = {a for entry in claims["access"] for a in entry["actions"]}
    pull = call(service, query=token_query(f"repository:{repository}:pull"), basic=(user, PASSWORD))
    may_pull = "pull" in {
        a
        for entry in jwt.decode(pull.body["token"], options={"verify_signature": False})["access"]
        for a in entry["actions"]
    }
    encoded = repository.replace("/", "%2F")
    if action == "pull":
        answer = request(service, "GET", f"/api/v1/repositories/{encoded}/tags", (user, PASSWORD))
        expected = 200 if action in granted else 404
    else:
        answer = request(
            service, "DELETE", f"/api/v1/repositories/{encoded}/tags/v1", (user, PASSWORD)
        )
        expected = 200 if action in granted else (403 if may_pull else 404)
    assert answer.status == expected, answer.body


@pytest.mark.parametrize(
    ("user", "visibility", "method", "status"),
    [
        ("outsider", "private", "GET", 404),
        ("outsider", "internal", "GET", 200),
        ("guest", "private", "GET", 404),
        ("reporter", "private", "DELETE", 403),
        ("developer", "public", "DELETE", 403),
        ("maintainer", "private", "DELETE", 200),
        ("owner", "internal", "DELETE", 200),
        ("root", "private", "DELETE", 200),
    ],
)
def test_rows_of_the_matrix_as_the_issue_states_them(world, user, visibility, method, status):
    """The matrix above could agree with a token endpoint that grants nothing: these rows
    pin what the roles mean (reporters read, maintainers and owners delete)."""
    service, _ = world
    path = f"/api/v1/repositories/{visibility}%2Fapp/tags" + ("/v1" if method == "DELETE" else "")
    assert request(service, method, path, (user, PASSWORD)).status == status
