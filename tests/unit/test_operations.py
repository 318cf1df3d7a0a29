"""The operations the admin API and the pages share, in-process: on a storage laid out
as Distribution lays it out and the token service's own decision (tests/appliance/
test_api.py runs them through nginx on a real registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.auth import credentials
from appliance.auth import operations as ops
from appliance.auth.app import TokenService
from appliance.auth.permissions import Principal
from appliance.auth.store import InvalidValueError, Store
from appliance.registry_content import RegistryContent
from appliance.registry_storage import FilesystemStorage, read_content
from tests.support.auth_requests import use_cheap_hasher
from tests.support.auth_server import make_config
from tests.unit.test_registry_storage import Layout

PASSWORD = "correct horse"


class FakeAPI:
    """Stands in for the registry's API in a unit test: deletes what the storage holds."""

    def __init__(self, layout: Layout) -> None:
        self.layout, self.deleted = layout, []

    def delete_manifest(self, repository: str, digest: str) -> bool:
        self.deleted.append((repository, digest))
        root = self.layout.root / "docker/registry/v2/repositories" / repository / "_manifests"
        for link in root.rglob("link"):
            if link.read_text() == digest:
                link.unlink()
        return True

    def delete_blob(self, repository: str, digest: str) -> bool:
        return True


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path / "auth")
    store = Store(config.database)
    users = {}
    for name, admin in (("root", True), ("alice", False), ("bob", False), ("carol", False)):
        users[name] = store.create_user(name, credentials.hash_password(PASSWORD), admin=admin)
    store.create_project("team/app", "private", True)
    store.create_project("team/public", "public", True)
    store.create_project("team/secret", "private", True)
    store.add_member("team/app", "alice", "maintainer")
    store.add_member("team/app", "bob", "reporter")
    service = TokenService(config, store)
    layout = Layout(tmp_path / "storage")
    v1 = layout.image("team/app", [b"base" * 1000, b"v1"], tag="v1")
    layout.tag("team/app", "latest", v1)
    layout.image("team/app", [b"base" * 1000, b"v2"], tag="v2")
    layout.image("team/public", [b"pub"], tag="v1")
    api = FakeAPI(layout)
    ctx = ops.Context(
        store=store,
        decide=service.decide_repository,
        content=lambda: RegistryContent(
            FilesystemStorage(layout.root), lambda: api, tmp_path / "lock"
        ),
    )

    def principal(name: str, scopes: frozenset[str] | None = None) -> Principal:
        user = users[name]
        return Principal("user", name, user.id, user.admin, scopes)

    return ctx, principal, layout


def test_each_user_lists_the_projects_they_can_see(world) -> None:
    ctx, principal, _ = world
    seen = {
        name: [p.path for p in ops.list_projects(ctx, principal(name))]
        for name in ("root", "alice", "carol")
    }
    assert seen == {
        "root": ["team/app", "team/public", "team/secret"],
        "alice": ["team/app", "team/public"],
        "carol": ["team/public"],
    }
    [app] = [p for p in ops.list_projects(ctx, principal("alice")) if p.path == "team/app"]
    assert (app.role, app.can_delete) == ("maintainer", True)
    with pytest.raises(ops.NotFound, match="no project 'team/secret' you can see"):
        ops.get_project(ctx, principal("carol"), "team/secret")


def test_repositories_and_tags_with_sizes_and_platforms(world) -> None:
    ctx, principal, _ = world
    [repo] = ops.list_repositories(ctx, principal("bob"), "team/app")
    assert (repo.name, repo.tags) == ("team/app", 3)
    assert 4000 < repo.size < 8000  # the shared base layer counts once
    tags = ops.list_tags(ctx, principal("bob"), "team/app")
    assert [t.tag for t in tags] == ["latest", "v1", "v2"]
    assert tags[0].digest == tags[1].digest and tags[0].platforms == ("amd64",)
    with pytest.raises(ops.NotFound):
        ops.list_tags(ctx, principal("carol"), "team/app")
    with pytest.raises(ops.Invalid, match="is not a repository name"):
        ops.list_tags(ctx, principal("bob"), "Team/App")


def test_a_maintainer_deletes_a_tag_a_reporter_may_not(world) -> None:
    ctx, principal, layout = world
    with pytest.raises(ops.Forbidden, match="role reporter in project team/app allows only pull"):
        ops.delete_tag(ctx, principal("bob"), "team/app", "v2")
    lines = ops.delete_tag(ctx, principal("alice"), "team/app", "v2")
    assert lines and "v2" in lines[0]
    tags = read_content(FilesystemStorage(layout.root)).repositories["team/app"].tags
    assert sorted(tags) == ["latest", "v1"]
    with pytest.raises(ops.NotFound, match="has no tag v2"):
        ops.delete_tag(ctx, principal("alice"), "team/app", "v2")


def test_a_personal_access_token_needs_the_api_scope(world) -> None:
    ctx, principal, _ = world
    with pytest.raises(ops.Forbidden, match="no 'api' scope"):
        ops.list_projects(ctx, principal("alice", frozenset({"read_registry"})))
    token = ops.create_token(ctx, principal("alice"), "ci", ["api"], "2999-12-31")
    assert token.secret.startswith("apat_") and token.scopes == ("api",)
    api_principal = principal("alice", frozenset({"api"}))
    assert ops.delete_tag(ctx, api_principal, "team/app", "v2")
    assert [t.id for t in ops.list_tokens(ctx, principal("alice"))] == [token.id]
    assert all(t.secret is None for t in ops.list_tokens(ctx, principal("alice")))
    ops.revoke_token(ctx, principal("alice"), token.id)
    assert ops.list_tokens(ctx, principal("alice"))[0].state == "revoked"
    with pytest.raises(ops.Invalid, match="'admin' is not a valid token scope"):
        ops.create_token(ctx, principal("alice"), "x", ["admin"])
    with pytest.raises(ops.Invalid, match="is in the past"):
        ops.create_token(ctx, principal("alice"), "x", ["api"], "2001-01-01")


def test_admin_only_and_owner_only_operations(world) -> None:
    ctx, principal, _ = world
    with pytest.raises(ops.Forbidden, match="Only administrators"):
        ops.list_users(ctx, principal("alice"))
    user = ops.create_user(ctx, principal("root"), "dave", "long enough pw")
    assert user.username == "dave" and not user.admin
    with pytest.raises(ops.Conflict, match="exists already"):
        ops.create_user(ctx, principal("root"), "dave", "long enough pw")
    with pytest.raises(ops.Invalid, match="too short"):
        ops.reset_password(ctx, principal("root"), "dave", "short")
    assert ops.set_blocked(ctx, principal("root"), "dave", True).blocked
    with pytest.raises(ops.Forbidden, match="Only owners of project team/app"):
        ops.set_member(ctx, principal("alice"), "team/app", "carol", "developer")
    ops.set_member(ctx, principal("root"), "team/app", "carol", "owner")
    ops.set_member(ctx, principal("carol"), "team/app", "dave", "reporter")
    assert ("dave", "reporter") in [
        (m.username, m.role) for m in ops.list_members(ctx, principal("alice"), "team/app")
    ]
    deploy = ops.create_deploy_token(ctx, principal("alice"), "team/app", "ci", ["read_registry"])
    assert deploy.username.startswith("appliance+deploy-token-") and deploy.secret
    with pytest.raises(ops.Forbidden):
        ops.list_deploy_tokens(ctx, principal("bob"), "team/app")
    with pytest.raises(ops.Conflict, match="still holds 1 repository"):
        ops.delete_project(ctx, principal("root"), "team/app")
    project = ops.create_project(ctx, principal("root"), "team/new", "internal")
    assert project.visibility == "internal"
    ops.delete_project(ctx, principal("root"), "team/new")


def test_the_api_scope_is_for_personal_access_tokens_only(world, capsys) -> None:
    ctx, principal, _ = world
    with pytest.raises(ops.Invalid, match="'api' is not a valid token scope"):
        ops.create_deploy_token(ctx, principal("alice"), "team/app", "robot", ["api"])
    with pytest.raises(InvalidValueError, match="'api' is not a valid token scope"):
        ctx.store.create_deploy_token("team/app", "robot", ["api"], None)
    token, _ = ctx.store.create_personal_access_token("bob", "ci", ["api"], None)
    assert token.scopes == frozenset({"api"})
