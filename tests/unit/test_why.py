"""`appliance-ctl why`: the token service's own decision, in sentences, as a table; the
asker's kinds (user, personal access token, deploy token, anonymous, blocked); the last
matching audit line, found from the end of the log and in its rotated generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.auth import credentials, why
from appliance.auth.app import TokenService
from appliance.auth.store import Store
from appliance.errors import AuthError
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import make_config

PASSWORD = "correct horse"


@pytest.fixture
def service(tmp_path: Path, monkeypatch, auth_database) -> TokenService:
    """The service on each engine (SQLite, PostgreSQL) in turn."""
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path, database=auth_database)
    store = Store(config.database)
    for name, admin in (("root", True), ("alice", False), ("bob", False), ("carol", False)):
        store.create_user(name, credentials.hash_password(PASSWORD), admin=admin)
    store.create_project("team/app", "private", True)
    store.create_project("team/public", "public", True)
    store.create_project("team/off", "public", False)
    store.add_member("team/app", "alice", "developer")
    store.add_member("team/app", "bob", "reporter")
    store.add_member("team/off", "alice", "owner")
    store.set_blocked("carol", True)
    return TokenService(config)


def explain(service: TokenService, who: str, action: str, repository: str, token=None):
    return why.explain(
        service.store,
        service.decide_repository,
        service.config.default_registry_enabled,
        who,
        action,
        repository,
        token,
        service.config.audit_log,
        time.time(),
    )


@pytest.mark.parametrize(
    ("who", "action", "repository", "headline", "fix"),
    [
        ("alice", "push", "team/app", "granted: alice may push team/app.", ""),
        (
            "bob",
            "push",
            "team/app",
            "refused: bob may not push team/app: role reporter in project team/app allows "
            "only pull.",
            "appliance-ctl member add team/app bob developer",
        ),
        (
            "alice",
            "delete",
            "team/app",
            "refused: alice may not delete team/app: role developer in project team/app "
            "allows only pull, push.",
            "appliance-ctl member add team/app alice maintainer",
        ),
        (
            "bob",
            "pull",
            "team/off",
            "refused: bob may not pull team/off: the container registry is disabled for "
            "project team/off.",
            "appliance-ctl project update team/off --registry",
        ),
        (
            "root",
            "push",
            "team/off",
            "refused: root may not push team/off: the container registry is disabled for "
            "project team/off.",
            "appliance-ctl project update team/off --registry",
        ),
        (
            "bob",
            "pull",
            "other/thing",
            "refused: bob may not pull other/thing: no project owns this repository.",
            "create a project owning it (appliance-ctl project create PATH, PATH a prefix of "
            "other/thing of at least two components) and add bob as a member, or make bob "
            "an administrator",
        ),
        ("root", "delete", "other/thing", "granted: root may delete other/thing.", ""),
        ("bob", "push", "bob/tools", "granted: bob may push bob/tools.", ""),
        (
            "-",
            "pull",
            "team/app",
            "refused: an anonymous client may not pull team/app: project team/app is not "
            "public; sign in.",
            "sign in, or appliance-ctl project update team/app --visibility public",
        ),
        ("-", "pull", "team/public", "granted: an anonymous client may pull team/public.", ""),
        (
            "carol",
            "pull",
            "team/public",
            "refused: carol may not pull team/public: the account carol is blocked: every "
            "sign-in gets 401.",
            "appliance-ctl user unblock carol",
        ),
    ],
)
def test_the_decision_in_sentences(service, who, action, repository, headline, fix) -> None:
    explanation = explain(service, who, action, repository)
    assert explanation.headline() == headline
    assert explanation.fix == fix
    assert explanation.granted == headline.startswith("granted")


def test_the_facts_name_role_visibility_switch_and_admin(service) -> None:
    facts = explain(service, "bob", "push", "team/app").facts
    assert facts == (
        "bob is a user (not an administrator), signing in with a password",
        "project team/app owns team/app (private, registry enabled)",
        "bob's role in team/app is reporter (allows pull)",
    )
    facts = explain(service, "root", "push", "team/off").facts
    assert facts[0] == "root is a user (an administrator), signing in with a password"
    assert facts[1] == "project team/off owns team/off (public, registry disabled)"
    assert "administrators may pull, push and delete" in facts[2]
    facts = explain(service, "bob", "push", "bob/tools").facts
    assert facts[1:] == (
        "bob/tools is in bob's personal namespace (private, registry enabled)",
        "bob owns the namespace bob (allows pull, push, delete)",
    )
    blocked = explain(service, "carol", "pull", "team/public")
    assert "carol is a user (not an administrator, blocked)" in blocked.facts[0]
    assert "once it signs in, pull would be granted" in blocked.facts


def test_personal_access_tokens_narrow_by_scope(service) -> None:
    token, _ = service.store.create_personal_access_token("alice", "ci", ["read_registry"], None)
    explanation = explain(service, "alice", "push", "team/app", token.id)
    assert explanation.headline() == (
        "refused: alice may not push team/app: the personal access token's scopes "
        "(read_registry) do not cover this."
    )
    assert "with personal access token" in explanation.facts[0]
    assert "--scope write_registry" in explanation.fix
    assert explain(service, "alice", "pull", "team/app", token.id).granted
    service.store.revoke_personal_access_token("alice", token.id)
    revoked = explain(service, "alice", "pull", "team/app", token.id)
    assert not revoked.granted and f"token {token.id} is revoked" in revoked.reason
    with pytest.raises(AuthError, match="has no personal access token 99"):
        explain(service, "alice", "pull", "team/app", 99)


def test_deploy_tokens_by_their_username(service) -> None:
    token, _ = service.store.create_deploy_token("team/app", "cluster", ["read_registry"], None)
    name = token.username
    assert explain(service, name, "pull", "team/app").granted
    push = explain(service, name, "push", "team/app")
    assert push.headline() == (
        f"refused: {name} may not push team/app: the deploy token's scopes allow only pull."
    )
    assert push.facts[0] == (
        f"{name} is deploy token {token.id} (cluster) of project team/app, scopes read_registry"
    )
    assert push.fix == "create a deploy token of team/app with --scope write_registry"
    other = explain(service, name, "pull", "bob/tools")
    assert other.reason == "this deploy token does not belong to project bob"
    with pytest.raises(
        AuthError, match="no deploy token signing in as 'appliance\\+deploy-token-9'"
    ):
        explain(service, "appliance+deploy-token-9", "pull", "team/app")


@pytest.mark.parametrize(
    ("who", "action", "repository", "message"),
    [
        ("nobody", "pull", "team/app", "There is no user named 'nobody'"),
        ("alice", "tag", "team/app", "'tag' is not an action"),
        ("alice", "pull", "Team/App", "'Team/App' is not a repository name"),
    ],
)
def test_bad_input_is_one_sentence(service, who, action, repository, message) -> None:
    with pytest.raises(AuthError, match=message):
        explain(service, who, action, repository)


def test_the_last_matching_audit_line(service) -> None:
    assert explain(service, "bob", "push", "team/app").audit is None
    call(service, query=token_query("repository:team/app:pull,push"), basic=("bob", PASSWORD))
    call(service, query=token_query("repository:team/app2:pull"), basic=("bob", PASSWORD))
    call(service, query=token_query("repository:team/app:pull"), basic=("alice", PASSWORD))
    explanation = explain(service, "bob", "push", "team/app")
    assert explanation.audit["requested"] == ["repository:team/app:pull,push"]
    assert explanation.audit["result"] == "partial"
    assert json.loads(explanation.audit_line) == explanation.audit
    lines = explanation.lines()
    assert lines[-2].startswith("last audit line for this user and repository, ")
    assert "partial (HTTP 200): repository:team/app:pull,push: role reporter" in lines[-2]
    call(service, query=token_query("repository:team/public:pull"))
    anonymous = explain(service, "-", "pull", "team/public")
    assert anonymous.audit["user"] == "" and anonymous.audit["result"] == "granted"


def test_the_audit_line_is_found_in_the_rotated_log_and_from_the_end(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    record = {"user": "bob", "requested": ["repository:team/app:pull"], "result": "granted"}
    Path(f"{log}.1").write_text(json.dumps(record, separators=(",", ":")) + "\n")
    filler = {"user": "alice", "requested": ["repository:team/app:pull"], "reason": "x" * 900}
    log.write_text((json.dumps(filler, separators=(",", ":")) + "\n") * 2000)
    found, _ = why.last_audit_record(log, "bob", "team/app")
    assert found == record
    newest = {**record, "result": "refused"}
    with log.open("a") as handle:
        handle.write(json.dumps(newest, separators=(",", ":")) + "\n")
        handle.write(json.dumps(filler, separators=(",", ":")) + "\n")
    assert why.last_audit_record(log, "bob", "team/app")[0] == newest
    # a repository whose name only starts like the one asked for does not match
    assert why.last_audit_record(log, "bob", "team/ap")[0] is None


def test_a_rule_of_the_decision_shows_up_by_itself_the_quota(service) -> None:
    """`why` knows nothing of quotas: the refusal is the service's decision's reason."""
    from tests.unit.test_usage_quota import envelope, event, post_events

    service.store.set_quota("team/app", 1000)
    pushed = envelope(event("push", "application/octet-stream", digest="sha256:aa", size=1500))
    assert post_events(service, pushed) == 204
    explanation = explain(service, "alice", "push", "team/app")
    assert explanation.headline() == (
        "refused: alice may not push team/app: team/app uses 1.5 KiB of its 1000 B quota; "
        "delete images (then run a garbage collection) or ask an administrator to raise "
        "the quota."
    )
    assert explanation.facts[3:] == (
        "team/app has a soft quota of 1000 B (appliance-ctl usage shows what it uses); "
        "over it, pushes are refused",
        "the token request is refused whole (HTTP 401), and the client prints this reason",
    )
    assert explanation.fix == ""  # the reason says what to do
    assert explain(service, "alice", "pull", "team/app").granted


def test_a_maintenance_window_shows_up_by_itself(service) -> None:
    """A garbage collection's window refuses pushes and deletes in the service's decision,
    so `why` explains it without knowing of it; pulls stay granted."""
    import os

    from appliance import registry_maintenance

    now = time.time()
    window = registry_maintenance.Window(
        reason="garbage collection",
        started=now,
        expected_end=now + 600,
        pid=os.getpid(),
        pid_start=registry_maintenance.process_start(os.getpid()),
    )
    registry_maintenance.write(service.config.maintenance_file, window)
    explanation = explain(service, "alice", "push", "team/app")
    assert not explanation.granted
    assert "registry is in maintenance (garbage collection) until about" in (explanation.headline())
    assert explain(service, "alice", "pull", "team/app").granted
    registry_maintenance.remove(service.config.maintenance_file)
    assert explain(service, "alice", "push", "team/app").granted
