"""The pages in-process: sign-in, sessions and their end, CSRF, escaping, who sees which
control. The browser test (tests/appliance/test_web.py) checks the same through nginx
and a real browser; these keep each rule fast to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.auth import credentials
from appliance.auth.app import TokenService
from appliance.auth.store import Store
from tests.support.auth_requests import use_cheap_hasher
from tests.support.auth_server import make_config
from tests.support.web_client import WebClient

PASSWORD = "correct horse"
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


@pytest.fixture
def service(tmp_path: Path, monkeypatch, auth_database) -> TokenService:
    """On each engine in turn (SQLite, PostgreSQL): the sessions' statements run on both."""
    use_cheap_hasher(monkeypatch)
    config = make_config(
        tmp_path, database=auth_database, rate_limit_user_failures=3, rate_limit_window=300
    )
    store = Store(config.database)
    for name, admin in (("root", True), ("alice", False), ("bob", False), ("carol", False)):
        store.create_user(name, credentials.hash_password(PASSWORD), admin=admin)
    store.create_project("team/app", "private", True)
    store.create_project("team/secret", "private", True)
    store.add_member("team/app", "alice", "owner")
    store.add_member("team/app", "bob", "reporter")
    store.set_project_description("team/app", HOSTILE)
    store.set_display_name("bob", HOSTILE)
    return TokenService(config)


def signed_in(service: TokenService, username: str) -> WebClient:
    client = WebClient(service)
    page = client.sign_in(username, PASSWORD)
    assert page.status == 303, page.text
    return client


def audit(service: TokenService) -> list[dict]:
    return [json.loads(line) for line in service.config.audit_log.read_text().splitlines()]


def test_pages_need_a_session(service) -> None:
    page = WebClient(service).get("/projects/team/app")
    assert page.status == 303
    assert page.header("Location") == "/sign-in?next=/projects/team/app"


def test_sign_in_sets_a_strict_session_cookie_and_goes_to_next(service) -> None:
    client = WebClient(service)
    form = client.get("/sign-in?next=/tokens")
    page = client.post(
        "/sign-in?next=/tokens",
        {"csrf_token": form.csrf_token, "username": "alice", "password": PASSWORD},
    )
    assert page.status == 303 and page.header("Location") == "/tokens"
    session = next(c for c in page.cookies_set() if c.startswith("__Host-appliance-session="))
    for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
        assert attribute in session
    assert "alice" in client.get("/").text
    assert audit(service)[-1]["result"] == "signed in"


def test_next_never_leaves_the_site(service) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        client = WebClient(service)
        form = client.get("/sign-in")
        page = client.post(
            "/sign-in?next=" + target,
            {"csrf_token": form.csrf_token, "username": "alice", "password": PASSWORD},
        )
        assert page.header("Location") == "/"


def test_wrong_password_is_refused_audited_and_rate_limited(service) -> None:
    client = WebClient(service)
    for _ in range(3):
        form = client.get("/sign-in")
        page = client.post(
            "/sign-in", {"csrf_token": form.csrf_token, "username": "alice", "password": "no"}
        )
        assert page.status == 400 and "Invalid username or password" in page.text
    form = client.get("/sign-in")
    page = client.post(
        "/sign-in", {"csrf_token": form.csrf_token, "username": "alice", "password": PASSWORD}
    )
    assert page.status == 429 and "Too many failed sign-ins" in page.text
    assert 0 < int(page.header("Retry-After")) <= 300
    assert [r["result"] for r in audit(service)] == ["denied"] * 4


def test_a_token_is_not_a_web_password(service) -> None:
    _, secret = service.store.create_personal_access_token("alice", "ci", ["read_registry"], None)
    page = WebClient(service).sign_in("alice", secret)
    assert page.status == 400 and "Sign in with your password" in page.text


def test_a_form_without_its_csrf_token_is_refused(service) -> None:
    client = signed_in(service, "alice")
    page = client.post("/tokens", {"name": "ci", "scopes": "read_registry"})
    assert page.status == 403 and "CSRF" in page.text
    assert service.store.list_personal_access_tokens("alice") == []
    # The sign-in form too (login CSRF): no cookie token, no sign-in.
    fresh = WebClient(service)
    page = fresh.post("/sign-in", {"username": "alice", "password": PASSWORD, "csrf_token": "x"})
    assert page.status == 403


def test_a_cross_site_post_is_refused_even_with_the_token(service) -> None:
    client = signed_in(service, "alice")
    token = client.get("/tokens").csrf_token
    form = {"csrf_token": token, "name": "ci", "scopes": "read_registry"}
    assert client.post("/tokens", form, headers={"Origin": "https://evil.example"}).status == 403
    assert client.post("/tokens", form, headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert service.store.list_personal_access_tokens("alice") == []
    same = client.post("/tokens", form, headers={"Origin": f"https://{client.host}"})
    assert same.status == 200


def test_a_password_change_ends_the_session(service) -> None:
    client = signed_in(service, "alice")
    assert client.get("/tokens").status == 200
    service.store.set_password_hash("alice", credentials.hash_password("a new password"))
    assert client.get("/tokens").status == 303


def test_blocking_ends_the_session_and_the_admin_page_does_it(service) -> None:
    alice = signed_in(service, "alice")
    root = signed_in(service, "root")
    page = root.post(
        "/admin/users/alice/block", {"csrf_token": root.get("/admin/users").csrf_token}
    )
    assert page.status == 303
    assert "alice was blocked" in root.get("/admin/users").text
    assert alice.get("/").status == 303


def test_sign_out_ends_the_session(service) -> None:
    client = signed_in(service, "alice")
    saved = dict(client.cookies)
    page = client.post("/sign-out", {"csrf_token": client.get("/").csrf_token})
    assert page.status == 303 and page.header("Location") == "/sign-in"
    client.cookies = saved  # the old cookie, replayed
    assert client.get("/").status == 303


def test_free_text_renders_as_text(service) -> None:
    root = signed_in(service, "root")
    for target in ("/", "/projects/team/app", "/projects/team/app/-/members", "/admin/users"):
        page = root.get(target)
        assert page.status == 200, target
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img" in root.get("/").text
    assert "script-src 'self'" in root.get("/").header("Content-Security-Policy")


def test_projects_are_those_the_user_may_see(service) -> None:
    bob = signed_in(service, "bob")
    page = bob.get("/")
    assert "team/app" in page.text and "team/secret" not in page.text
    assert bob.get("/projects/team/secret").status == 404
    assert "team/secret" in signed_in(service, "root").get("/").text


def test_members_and_deploy_tokens_by_role(service) -> None:
    bob = signed_in(service, "bob")
    page = bob.get("/projects/team/app/-/members")  # members see who else is
    assert page.status == 200 and "Save member" not in page.text and "Remove" not in page.text
    assert (
        bob.post(
            "/projects/team/app/-/members",
            {"csrf_token": page.csrf_token, "username": "carol", "role": "owner"},
        ).status
        == 403
    )
    assert bob.get("/projects/team/app/-/deploy-tokens").status == 403
    assert "Deploy tokens" not in bob.get("/projects/team/app").text
    alice = signed_in(service, "alice")
    page = alice.get("/projects/team/app/-/members")
    assert page.status == 200
    page = alice.post(
        "/projects/team/app/-/members",
        {"csrf_token": page.csrf_token, "username": "carol", "role": "developer"},
    )
    assert page.status == 303
    assert [m.role for m in service.store.list_members("team/app") if m.username == "carol"] == [
        "developer"
    ]


def test_personal_access_token_is_shown_once_and_works(service) -> None:
    client = signed_in(service, "alice")
    page = client.post(
        "/tokens",
        {
            "csrf_token": client.get("/tokens").csrf_token,
            "name": "laptop",
            "scopes": ["read_registry", "write_registry"],
            "expires": "2999-12-31",
        },
    )
    assert page.status == 200
    secret = page.text.split('id="new-token" class="copyable" readonly value="')[1].split('"')[0]
    signed = service.authenticator.sign_in("alice", secret, "127.0.0.1", 0)
    assert signed.via == "personal_access_token"
    assert signed.principal.token_scopes == {"read_registry", "write_registry"}
    assert secret not in client.get("/tokens").text
    token_id = service.store.list_personal_access_tokens("alice")[0].id
    page = client.post(f"/tokens/{token_id}/revoke", {"csrf_token": page.csrf_token})
    assert page.status == 303
    assert "was revoked" in client.get("/tokens").text


def test_admin_pages_are_for_admins(service) -> None:
    alice = signed_in(service, "alice")
    assert alice.get("/admin/users").status == 403
    assert alice.get("/admin/projects").status == 403


def test_static_files_and_unknown_pages(service) -> None:
    client = WebClient(service)
    page = client.get("/static/app.css")
    assert page.status == 200 and page.header("Content-Type").startswith("text/css")
    assert client.get("/static/../pages.py").status == 404
    assert signed_in(service, "alice").get("/nothing/here").status == 404


def test_an_idle_or_old_session_ends(service) -> None:
    client = signed_in(service, "alice")
    assert client.get("/tokens").status == 200
    service.store._write("UPDATE web_sessions SET expires_at = 1")
    assert client.get("/tokens").status == 303
    assert service.store._one("SELECT COUNT(*) FROM web_sessions")[0] == 0  # forgotten


def test_a_user_keeps_a_bounded_number_of_sessions(service) -> None:
    for _ in range(25):
        signed_in(service, "alice")
    assert service.store._one("SELECT COUNT(*) FROM web_sessions")[0] == 20


def test_admin_creates_a_user_and_resets_a_password(service) -> None:
    root = signed_in(service, "root")
    token = root.get("/admin/users").csrf_token
    page = root.post(
        "/admin/users",
        {"csrf_token": token, "username": "dave", "password": "dave password 1"},
    )
    assert page.status == 303 and "User dave was created." in root.get("/admin/users").text
    page = root.post("/admin/users", {"csrf_token": token, "username": "erin", "password": "x"})
    assert page.status == 400 and "too short" in page.text
    page = root.post(
        "/admin/users/dave/password", {"csrf_token": token, "password": "dave new pw 2"}
    )
    assert page.status == 303
    assert WebClient(service).sign_in("dave", "dave new pw 2").status == 303


def test_gc_page_shows_the_collections_and_the_janitors_last_run(service) -> None:
    data = service.config.gc_stats_file.parent
    data.mkdir(parents=True, exist_ok=True)
    service.config.gc_stats_file.write_text(
        json.dumps(
            {
                "runs": 2,
                "freed_bytes_total": 3 * 1024**2,
                "freed_blobs_total": 7,
                "last": {"started": 100, "finished": 160, "freed_bytes": 1024, "freed_blobs": 1},
            }
        )
    )
    (data / "janitor.json").write_text(
        json.dumps(
            {
                "last": {"started": 100, "finished": 170, "deleted_tags": 4, "result": "ok"},
                "next": 86400,
            }
        )
    )
    page = signed_in(service, "root").get("/admin/gc")
    assert page.status == 200
    assert "2 collections so far, 3 MiB freed in 7 blobs" in page.text
    assert "<td>4</td>" in page.text and "1970-01-02 00:00 UTC" in page.text
    assert signed_in(service, "alice").get("/admin/gc").status == 403


def test_project_page_draws_the_recorded_usage_and_now(service) -> None:
    from appliance.auth.usage import appended_history, history_file

    figures = {"computed_at": 200.0, "projects": {"team/app": {"bytes": 3 * 1024**2}}}
    history = appended_history(
        [{"at": 100.0, "projects": {"team/app": 1024**2}}], figures
    )  # two computations
    service.config.usage_file.parent.mkdir(parents=True, exist_ok=True)
    service.config.usage_file.write_text(json.dumps(figures))
    history_file(service.config.usage_file).write_text(json.dumps(history))
    page = signed_in(service, "root").get("/projects/team/app")
    assert page.status == 200
    assert page.text.count("<circle") == 2  # the computation equals now: no third point
    assert "3 MiB now" in page.text
    assert '1970-01-01 00:01 UTC</td><td class="number">1 MiB' in page.text
