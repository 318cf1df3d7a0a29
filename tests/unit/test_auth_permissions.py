"""The permission matrix as tables: who (principal and role) x project visibility x
registry switch x requested actions -> granted actions."""

from __future__ import annotations

import pytest

from appliance.auth.permissions import (
    ANONYMOUS,
    DEPLOY_TOKEN,
    USER,
    Principal,
    ProjectAccess,
    decide,
    decide_catalog,
)

OWN_PROJECT, OTHER_PROJECT = 7, 8

PRINCIPALS = {
    "anonymous": (Principal(kind=ANONYMOUS), None),
    "no-role": (Principal(kind=USER, name="carol", user_id=3), None),
    "guest": (Principal(kind=USER, name="carol", user_id=3), "guest"),
    "reporter": (Principal(kind=USER, name="carol", user_id=3), "reporter"),
    "developer": (Principal(kind=USER, name="carol", user_id=3), "developer"),
    "maintainer": (Principal(kind=USER, name="carol", user_id=3), "maintainer"),
    "owner": (Principal(kind=USER, name="carol", user_id=3), "owner"),
    "admin": (Principal(kind=USER, name="root", user_id=1, admin=True), None),
}

# Requested: pull,push,delete. Registry enabled. "-" = nothing granted.
USER_MATRIX = """
principal    private           internal          public
anonymous    -                 -                 pull
no-role      -                 pull              pull
guest        -                 pull              pull
reporter     pull              pull              pull
developer    pull,push         pull,push         pull,push
maintainer   pull,push,delete  pull,push,delete  pull,push,delete
owner        pull,push,delete  pull,push,delete  pull,push,delete
admin        pull,push,delete  pull,push,delete  pull,push,delete
"""


def _matrix_rows():
    lines = [line.split() for line in USER_MATRIX.strip().splitlines()]
    visibilities = lines[0][1:]
    for name, *cells in lines[1:]:
        for visibility, granted in zip(visibilities, cells, strict=True):
            yield name, visibility, granted


def _project(visibility: str, enabled: bool, role: str | None, project_id: int = OWN_PROJECT):
    return ProjectAccess(
        path="team/app",
        visibility=visibility,
        registry_enabled=enabled,
        role=role,
        project_id=project_id,
    )


def _actions(text: str) -> tuple[str, ...]:
    return () if text == "-" else tuple(text.split(","))


@pytest.mark.parametrize("name,visibility,granted", list(_matrix_rows()))
@pytest.mark.parametrize("registry_enabled", [True, False])
def test_user_matrix(name: str, visibility: str, granted: str, registry_enabled: bool) -> None:
    principal, role = PRINCIPALS[name]
    project = _project(visibility, registry_enabled, role)
    decision = decide(principal, project, ["pull", "push", "delete"])
    expected = _actions(granted) if registry_enabled else ()  # disabled grants nothing
    assert decision.granted == expected
    assert (decision.reason == "") == (expected == ("pull", "push", "delete"))


# principal, visibility, requested, granted
STAR_AND_PARTIAL = [
    ("maintainer", "private", "*", "*"),
    ("owner", "private", "*", "*"),
    ("admin", "private", "*", "*"),
    ("developer", "private", "*", "-"),  # '*' means delete too: not for developers
    ("reporter", "private", "pull,push", "pull"),  # partial grant
    ("developer", "private", "pull,pull,push", "pull,push"),  # duplicates collapse
    ("maintainer", "private", "delete", "delete"),
    ("maintainer", "private", "pull,frobnicate", "pull"),  # unknown actions dropped
    ("anonymous", "public", "*", "-"),
    ("guest", "internal", "push", "-"),
]


@pytest.mark.parametrize("name,visibility,requested,granted", STAR_AND_PARTIAL)
def test_star_and_partial_grants(name, visibility, requested, granted) -> None:
    principal, role = PRINCIPALS[name]
    decision = decide(principal, _project(visibility, True, role), requested.split(","))
    assert decision.granted == _actions(granted)


def _pat(role_name: str, *scopes: str) -> tuple[Principal, str | None]:
    principal, role = PRINCIPALS[role_name]
    return Principal(
        kind=USER,
        name=principal.name,
        user_id=principal.user_id,
        admin=principal.admin,
        token_scopes=frozenset(scopes),
    ), role


def _deploy(project_id: int, *scopes: str) -> tuple[Principal, None]:
    return Principal(
        kind=DEPLOY_TOKEN,
        name="appliance+deploy-token-1",
        token_scopes=frozenset(scopes),
        project_id=project_id,
    ), None


# (principal, role), visibility, requested, granted
TOKENS = [
    (_pat("developer", "read_registry"), "private", "pull,push", "pull"),
    (_pat("developer", "write_registry"), "private", "pull,push", "pull,push"),
    (_pat("reporter", "write_registry"), "private", "pull,push", "pull"),  # role still limits
    (_pat("maintainer", "read_registry", "write_registry"), "private", "*", "*"),
    (_pat("maintainer", "read_registry"), "private", "*", "-"),
    (_pat("admin", "read_registry"), "private", "pull,push", "pull"),
    (_pat("no-role", "read_registry"), "internal", "pull", "pull"),
    (_deploy(OWN_PROJECT, "read_registry"), "private", "pull,push", "pull"),
    (_deploy(OWN_PROJECT, "write_registry"), "private", "pull,push,delete", "pull,push"),
    (_deploy(OTHER_PROJECT, "write_registry"), "private", "pull", "-"),
    (_deploy(OTHER_PROJECT, "read_registry"), "internal", "pull", "-"),
    (_deploy(OTHER_PROJECT, "read_registry"), "public", "pull,push", "pull"),
]


@pytest.mark.parametrize("who,visibility,requested,granted", TOKENS)
def test_tokens_narrow_what_the_role_allows(who, visibility, requested, granted) -> None:
    principal, role = who
    project = _project(visibility, True, role)
    assert decide(principal, project, requested.split(",")).granted == _actions(granted)


@pytest.mark.parametrize(
    "name,granted",
    [("admin", "pull,push,delete"), ("owner", "-"), ("no-role", "-"), ("anonymous", "-")],
)
def test_repository_without_project(name: str, granted: str) -> None:
    principal, _ = PRINCIPALS[name]
    decision = decide(principal, None, ["pull", "push", "delete"])
    assert decision.granted == _actions(granted)
    if granted == "-":
        assert decision.reason == "no project owns this repository"


@pytest.mark.parametrize(
    "name,granted", [("admin", "*"), ("owner", "-"), ("developer", "-"), ("anonymous", "-")]
)
def test_catalog_is_for_admins(name: str, granted: str) -> None:
    principal, _ = PRINCIPALS[name]
    assert decide_catalog(principal, ["*"]).granted == _actions(granted)


def test_refusal_reasons_name_the_cause() -> None:
    reporter, role = PRINCIPALS["reporter"]
    assert decide(reporter, _project("private", True, role), ["push"]).reason == (
        "role reporter in project team/app allows only pull"
    )
    assert decide(reporter, _project("private", False, role), ["pull"]).reason == (
        "the container registry is disabled for project team/app"
    )
    outsider, _ = PRINCIPALS["no-role"]
    assert "not a member" in decide(outsider, _project("private", True, None), ["pull"]).reason
