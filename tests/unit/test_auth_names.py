"""Project paths against the registry's repository-name grammar: a table of paths and
the problem each one's message must name."""

from __future__ import annotations

import pytest

from appliance.auth.names import (
    InvalidPathError,
    is_repository_name,
    path_prefixes,
    validate_project_path,
    validate_username,
)

VALID = [
    "alice/web",
    "group/sub/app",
    "a/b",
    "team/my.app",
    "team/my_app",
    "team/my__app",
    "team/my-app",
    "team/app2",
    "0/9",
    "group/" + "a" * 240,
]

# path, words the message must contain
INVALID = [
    ("team/_app", "starts with an underscore"),
    ("_team/app", "starts with an underscore"),
    ("team/app-", "ends with a hyphen"),
    ("team/app.", "ends with a period"),
    ("team/my--app", "double hyphen"),
    ("Team/app", "uppercase"),
    ("team/App", "uppercase"),
    ("team/my app", "characters the registry does not allow: ' '"),
    ("team/ap@p", "'@'"),
    ("team//app", "empty component"),
    ("/team/app", "empty component"),
    ("team/app/", "empty component"),
    ("team/my___app", "separators"),
    ("team/my._app", "separators"),
    ("app", "needs a namespace and a name"),
    ("", "empty"),
    ("group/" + "a" * 250, "at most 255"),
]


@pytest.mark.parametrize("path", VALID)
def test_valid_project_paths(path: str) -> None:
    assert validate_project_path(path) == path
    assert is_repository_name(path)


@pytest.mark.parametrize("path,problem", INVALID)
def test_invalid_project_paths_name_the_problem(path: str, problem: str) -> None:
    with pytest.raises(InvalidPathError) as raised:
        validate_project_path(path)
    message = str(raised.value)
    assert message.startswith(f"Invalid project path '{path}': ")
    assert problem in message
    assert message.endswith(".")


def test_registry_grammar_allows_double_hyphen_but_projects_do_not() -> None:
    # distribution 2.8 accepts it (so a scope for it is well-formed); older clients do not.
    assert is_repository_name("team/my--app")
    with pytest.raises(InvalidPathError):
        validate_project_path("team/my--app")


@pytest.mark.parametrize(
    "name,ok",
    [
        ("alice", True),
        ("a.b-c_d", True),
        ("Alice", False),
        ("al/ice", False),
        ("-alice", False),
        ("", False),
    ],
)
def test_usernames_are_one_path_component(name: str, ok: bool) -> None:
    if ok:
        assert validate_username(name) == name
    else:
        with pytest.raises(InvalidPathError, match="Invalid username"):
            validate_username(name)


def test_prefixes_are_component_wise_longest_first() -> None:
    assert path_prefixes("group/app/sub/image") == [
        "group/app/sub/image",
        "group/app/sub",
        "group/app",
        "group",
    ]
