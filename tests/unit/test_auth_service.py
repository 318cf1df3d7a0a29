"""The token endpoint in-process: grants, refusals, refresh tokens, rate limits, tokens
as passwords, client addresses and the audit trail."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jwt
import pytest

from appliance.auth import credentials
from appliance.auth.app import TokenService
from appliance.auth.store import Store
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import make_config

PASSWORD = "correct horse"


@pytest.fixture
def service(tmp_path: Path, monkeypatch, auth_database) -> TokenService:
    """The service on each engine (SQLite, PostgreSQL) in turn."""
    use_cheap_hasher(monkeypatch)
    config = make_config(
        tmp_path,
        database=auth_database,
        rate_limit_user_failures=3,
        rate_limit_address_failures=5,
        rate_limit_window=300,
    )
    store = Store(config.database)
    for name, admin in (("root", True), ("alice", False), ("bob", False), ("carol", False)):
        store.create_user(name, credentials.hash_password(PASSWORD), admin=admin)
    store.create_project("team/app", "private", True)
    store.create_project("team/public", "public", True)
    store.create_project("team/internal", "internal", True)
    store.create_project("team/off", "public", False)
    store.add_member("team/app", "alice", "developer")
    store.add_member("team/app", "bob", "reporter")
    store.add_member("team/off", "alice", "owner")
    return TokenService(config)


def claims(response) -> dict:
    return jwt.decode(response.body["token"], options={"verify_signature": False})


def access(response) -> list:
    return claims(response)["access"]


def audit(service: TokenService) -> list[dict]:
    return [json.loads(line) for line in service.config.audit_log.read_text().splitlines()]


def test_developer_gets_pull_and_push(service) -> None:
    response = call(
        service, query=token_query("repository:team/app:pull,push"), basic=("alice", PASSWORD)
    )
    assert response.status == 200
    assert access(response) == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]
    body = response.body
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == service.config.token_lifetime
    assert datetime.fromisoformat(body["issued_at"]).timestamp() == claims(response)["iat"]
    assert "refresh_token" not in body
    assert response.headers["Cache-Control"] == "no-store"


def test_partial_and_empty_grants_are_still_200(service) -> None:
    partial = call(
        service, query=token_query("repository:team/app:pull,push"), basic=("bob", PASSWORD)
    )
    assert partial.status == 200
    assert access(partial) == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    empty = call(service, query=token_query("repository:team/app:pull"), basic=("carol", PASSWORD))
    assert empty.status == 200 and access(empty) == []
    assert [r["result"] for r in audit(service)] == ["partial", "refused"]


def test_several_scopes_and_space_separated_scopes(service) -> None:
    response = call(
        service,
        basic=("alice", PASSWORD),
        query=token_query(
            "repository:team/app:pull",
            "repository:team/public:pull registry:catalog:*",
        ),
    )
    assert [a["name"] for a in access(response)] == ["team/app", "team/public"]


def test_anonymous_pull_of_public_project_only(service) -> None:
    public = call(service, query=token_query("repository:team/public:pull,push"))
    assert public.status == 200
    assert access(public) == [{"type": "repository", "name": "team/public", "actions": ["pull"]}]
    assert claims(public)["sub"] == ""
    for name in ("team/app", "team/internal", "team/off"):
        assert access(call(service, query=token_query(f"repository:{name}:pull"))) == []


def test_internal_project_is_pullable_by_any_signed_in_user(service) -> None:
    response = call(
        service, query=token_query("repository:team/internal:pull,push"), basic=("carol", PASSWORD)
    )
    assert access(response)[0]["actions"] == ["pull"]


def test_disabled_registry_grants_nothing_even_to_the_owner(service) -> None:
    response = call(
        service, query=token_query("repository:team/off:pull,push"), basic=("alice", PASSWORD)
    )
    assert access(response) == []
    assert "registry is disabled" in audit(service)[-1]["reason"]


def test_repository_below_a_project_belongs_to_it(service) -> None:
    response = call(
        service,
        query=token_query("repository:team/app/sub/image:pull,push"),
        basic=("alice", PASSWORD),
    )
    assert access(response)[0]["actions"] == ["pull", "push"]


def test_the_longest_project_path_wins(service) -> None:
    Store(service.config.database).create_project("team/app/tools", "public", True)
    response = call(
        service,
        query=token_query("repository:team/app/tools/lint:pull,push", "repository:team/app/x:push"),
        basic=("alice", PASSWORD),
    )
    # alice develops team/app, but team/app/tools is its own (public) project.
    assert [(a["name"], a["actions"]) for a in access(response)] == [
        ("team/app/tools/lint", ["pull"]),
        ("team/app/x", ["push"]),
    ]


def test_personal_namespace_belongs_to_its_user(service) -> None:
    own = call(
        service, query=token_query("repository:alice/tool:pull,push,*"), basic=("alice", PASSWORD)
    )
    assert access(own)[0]["actions"] == ["pull", "push", "*"]
    other = call(service, query=token_query("repository:alice/tool:pull"), basic=("bob", PASSWORD))
    assert access(other) == []


def test_admin_gets_everything_including_the_catalog(service) -> None:
    response = call(
        service,
        basic=("root", PASSWORD),
        query=token_query(
            "repository:team/app:*",
            "registry:catalog:*",
            "repository:nobody/x:pull,push",
        ),
    )
    assert [(a["name"], a["actions"]) for a in access(response)] == [
        ("team/app", ["*"]),
        ("catalog", ["*"]),
        ("nobody/x", ["pull", "push"]),
    ]
    refused = call(service, query=token_query("registry:catalog:*"), basic=("alice", PASSWORD))
    assert access(refused) == []


def test_bad_credentials_are_401_with_a_readable_message(service) -> None:
    for user, password in (("alice", "wrong password"), ("nobody", PASSWORD)):
        response = call(
            service, query=token_query("repository:team/app:pull"), basic=(user, password)
        )
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert (
            response.message == "Invalid username or password (or personal access / deploy token)."
        )


def test_blocked_user_is_refused_and_told_so(service) -> None:
    Store(service.config.database).set_blocked("alice", True)
    response = call(
        service, query=token_query("repository:team/app:pull"), basic=("alice", PASSWORD)
    )
    assert response.status == 401
    assert "blocked" in response.message


def test_unknown_service_is_400(service) -> None:
    response = call(
        service,
        query=token_query("repository:team/app:pull", service="other"),
        basic=("alice", PASSWORD),
    )
    assert response.status == 400
    assert "Unknown service 'other'" in response.message


def test_health(service) -> None:
    assert call(service, path="/-/health").body == {"status": "ok"}


# -- refresh tokens ---------------------------------------------------------------------
def test_docker_login_gets_a_refresh_token_that_post_accepts(service) -> None:
    login = call(
        service,
        basic=("alice", PASSWORD),
        query=token_query(offline_token="true", client_id="docker"),
    )
    assert login.status == 200 and access(login) == []
    refresh_token = login.body["refresh_token"]

    refreshed = call(
        service,
        method="POST",
        form={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": "container_registry",
            "scope": "repository:team/app:pull,push",
            "client_id": "docker",
        },
    )
    assert refreshed.status == 200
    assert access(refreshed)[0]["actions"] == ["pull", "push"]
    assert refreshed.body["scope"] == "repository:team/app:pull,push"
    assert claims(refreshed)["sub"] == "alice"


def test_oauth_password_grant_with_offline_access(service) -> None:
    response = call(
        service,
        method="POST",
        form={
            "grant_type": "password",
            "username": "alice",
            "password": PASSWORD,
            "service": "container_registry",
            "scope": "repository:team/app:pull",
            "client_id": "containerd",
            "access_type": "offline",
        },
    )
    assert response.status == 200
    assert response.body["refresh_token"].startswith("art_")
    online = call(
        service,
        method="POST",
        form={
            "grant_type": "password",
            "username": "alice",
            "password": PASSWORD,
            "service": "container_registry",
            "client_id": "x",
        },
    )
    assert "refresh_token" not in online.body
    wrong = call(
        service,
        method="POST",
        form={
            "grant_type": "password",
            "username": "alice",
            "password": "nope nope",
            "service": "container_registry",
        },
    )
    assert wrong.status == 401 and wrong.body["error"] == "invalid_grant"


def test_password_change_or_block_kills_refresh_tokens(service) -> None:
    store = Store(service.config.database)
    form = {
        "grant_type": "refresh_token",
        "service": "container_registry",
        "scope": "repository:team/app:pull",
    }

    def login() -> str:
        return call(
            service, basic=("alice", PASSWORD), query=token_query(offline_token="true")
        ).body["refresh_token"]

    first = login()
    store.set_password_hash("alice", credentials.hash_password(PASSWORD))
    response = call(service, method="POST", form={**form, "refresh_token": first})
    assert response.status == 401 and "sign in again" in response.message

    second = login()
    store.set_blocked("alice", True)
    assert call(service, method="POST", form={**form, "refresh_token": second}).status == 401
    garbage = call(service, method="POST", form={**form, "refresh_token": "art_nonsense"})
    assert garbage.status == 401


def test_refresh_token_expires(service, monkeypatch) -> None:
    refresh_token = call(
        service, basic=("alice", PASSWORD), query=token_query(offline_token="true")
    ).body["refresh_token"]
    import appliance.auth.app as app_module

    later = app_module.time.time() + service.config.refresh_token_lifetime + 1
    monkeypatch.setattr(app_module.time, "time", lambda: later)
    response = call(
        service,
        method="POST",
        form={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": "container_registry",
        },
    )
    assert response.status == 401


def test_unsupported_grant_type(service) -> None:
    response = call(service, method="POST", form={"grant_type": "client_credentials"})
    assert response.status == 400 and response.body["error"] == "unsupported_grant_type"


# -- rate limit -------------------------------------------------------------------------
def test_failed_sign_ins_are_limited_per_user(service) -> None:
    query = token_query("repository:team/app:pull")
    for _ in range(3):
        assert call(service, query=query, basic=("bob", "bad password")).status == 401
    limited = call(service, query=query, basic=("bob", "bad password"))
    assert limited.status == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 300
    assert "Too many failed sign-ins" in limited.message
    # The right password does not get around it either (it is not in the cache)...
    assert call(service, query=query, basic=("bob", PASSWORD)).status == 429
    # ...but other users are not affected.
    assert call(service, query=query, basic=("carol", PASSWORD)).status == 200


def test_failed_sign_ins_are_limited_per_address(service) -> None:
    query = token_query("repository:team/app:pull")
    users = ["u1", "u2", "u3", "u4", "u5"]
    for user in users:  # five different usernames from one address
        assert call(service, query=query, basic=(user, "x" * 9), peer="10.1.1.1").status == 401
    assert call(service, query=query, basic=("alice", PASSWORD), peer="10.1.1.1").status == 429
    assert call(service, query=query, basic=("alice", PASSWORD), peer="10.1.1.2").status == 200


def test_the_window_ends(service, monkeypatch) -> None:
    query = token_query("repository:team/app:pull")
    for _ in range(4):
        call(service, query=query, basic=("bob", "bad password"))
    import appliance.auth.app as app_module

    later = app_module.time.time() + 301
    monkeypatch.setattr(app_module.time, "time", lambda: later)
    assert call(service, query=query, basic=("bob", PASSWORD)).status == 200
    # The next failure also clears the finished windows of every guessed name.
    call(service, query=query, basic=("someone", "bad password"))
    subjects = ["user:bob", "user:someone", "address:127.0.0.1"]
    rows = service.store.failed_signins(subjects, int(later), window=10**9)
    assert rows == {"user:someone": (1, int(later)), "address:127.0.0.1": (1, int(later))}


def test_client_address_from_x_real_ip_only_behind_a_trusted_proxy(service) -> None:
    query = token_query("repository:team/public:pull")
    call(service, query=query, peer="127.0.0.1", headers={"X-Real-IP": "203.0.113.9"})
    call(service, query=query, peer="198.51.100.7", headers={"X-Real-IP": "203.0.113.9"})
    assert [record["client"] for record in audit(service)] == ["203.0.113.9", "198.51.100.7"]


# -- tokens as passwords ----------------------------------------------------------------
def test_personal_access_token_works_as_password_within_its_scopes(service) -> None:
    store = Store(service.config.database)
    read_only, read_secret = store.create_personal_access_token(
        "alice", "ci", ["read_registry"], None
    )
    _, write_secret = store.create_personal_access_token("alice", "ci", ["write_registry"], None)
    query = token_query("repository:team/app:pull,push")
    assert access(call(service, query=query, basic=("alice", read_secret)))[0]["actions"] == [
        "pull"
    ]
    assert access(call(service, query=query, basic=("alice", write_secret)))[0]["actions"] == [
        "pull",
        "push",
    ]
    # Another user's name with alice's token is not alice.
    assert call(service, query=query, basic=("bob", write_secret)).status == 401
    store.revoke_personal_access_token("alice", read_only.id)
    revoked = call(service, query=query, basic=("alice", read_secret))
    assert revoked.status == 401 and "revoked" in revoked.message


def test_expired_personal_access_token(service) -> None:
    store = Store(service.config.database)
    _, secret = store.create_personal_access_token("alice", "old", ["read_registry"], 1000)
    response = call(service, query=token_query("repository:team/app:pull"), basic=("alice", secret))
    assert response.status == 401 and "expired" in response.message


def test_deploy_token_is_limited_to_its_project(service) -> None:
    store = Store(service.config.database)
    token, secret = store.create_deploy_token("team/app", "deploy", ["read_registry"], None)
    assert token.username == f"appliance+deploy-token-{token.id}"
    response = call(
        service,
        basic=(token.username, secret),
        query=token_query(
            "repository:team/app:pull,push",
            "repository:team/internal:pull",
            "repository:team/public:pull",
        ),
    )
    assert response.status == 200
    assert [(a["name"], a["actions"]) for a in access(response)] == [
        ("team/app", ["pull"]),
        ("team/public", ["pull"]),
    ]
    assert call(service, basic=(token.username, "adt_wrong"), query=token_query()).status == 401
    store.revoke_deploy_token("team/app", token.id)
    assert call(service, basic=(token.username, secret), query=token_query()).status == 401


# -- audit ------------------------------------------------------------------------------
def test_every_grant_and_denial_is_audited(service) -> None:
    call(
        service,
        query=token_query("repository:team/app:pull,push"),
        basic=("bob", PASSWORD),
        headers={"X-Real-IP": "192.0.2.1"},
    )
    call(service, query=token_query("repository:team/app:pull"), basic=("bob", "wrong pass"))
    granted, denied = audit(service)
    assert granted["user"] == "bob" and granted["client"] == "192.0.2.1"
    assert granted["requested"] == ["repository:team/app:pull,push"]
    assert granted["granted"] == ["repository:team/app:pull"]
    assert granted["result"] == "partial"
    assert "role reporter in project team/app allows only pull" in granted["reason"]
    assert denied["result"] == "denied" and denied["status"] == 401
    assert denied["reason"] == "wrong password" and denied["granted"] == []
    assert datetime.fromisoformat(denied["time"])
